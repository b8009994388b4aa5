"""A long process compiling many distinct programs stays far below ``vm.max_map_count``.

Every compiled XLA:CPU executable keeps several memory mappings alive; a process that compiles
thousands of distinct programs (a sweep over layer shapes, the whole test suite in one process)
passed the kernel's ``vm.max_map_count`` (65,530) and segfaulted inside XLA.
:func:`spectra.clear_caches` is the documented remedy. The workload runs in a fresh subprocess
(this one already holds the programs of other tests) and reads its own ``/proc/self/maps``.
"""

import json
import os
import subprocess
import sys
import textwrap
import unittest

from tests import xla_flags

#: Distinct specs compiled, and how many between two calls of ``spectra.clear_caches()``.
NUM_SPECS = 100
CHUNK = 25

#: Bound on the growth of the mapping count over the whole workload. Measured (jax 0.10.2,
#: CPU): ~10 mappings per compiled program, so ~1,000 more mappings at the end of these 100
#: specs *without* clearing (1,481 for 150 specs): the bound fails without the clearing, while
#: clearing every 25 specs peaked at +347 for 150.
MAX_GROWTH = 600

_WORKLOAD = textwrap.dedent(
    f"""
    import json
    import jax.numpy as jnp
    import spectra

    def count():
        with open("/proc/self/maps") as f:
            return sum(1 for _ in f)

    kernel = jnp.ones((2, 2, 1, 1), jnp.float32)
    base = peak = count()
    freed = []
    for i in range({NUM_SPECS}):
        spec = spectra.ConvSpec((6 + i % 20, 6 + i // 20), padding="CIRCULAR")
        spectra.spectral_norm(kernel, spec).block_until_ready()
        peak = max(peak, count())
        if i % {CHUNK} == {CHUNK} - 1:
            before = count()
            spectra.clear_caches()
            freed.append(before - count())
    print(json.dumps(dict(base=base, peak=peak, end=count(), freed=freed)))
    """
)


@unittest.skipUnless(os.path.exists("/proc/self/maps"), "needs Linux /proc/self/maps")
class LongProcessTest(unittest.TestCase):
    def test_mappings_stay_bounded_with_clear_caches(self):
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env = xla_flags.with_flags(  # LLVM -O0: compiling the 100 programs is the cost.
            dict(os.environ, PYTHONPATH=os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]))
        )
        out = subprocess.run(
            [sys.executable, "-c", _WORKLOAD], env=env, capture_output=True, text=True,
            timeout=600, check=False,
        )
        self.assertEqual(out.returncode, 0, out.stderr[-3000:])
        result = json.loads(out.stdout.strip().splitlines()[-1])
        # The check is not vacuous: each chunk's programs held mappings that clearing freed.
        self.assertEqual(len(result["freed"]), NUM_SPECS // CHUNK)
        self.assertGreater(min(result["freed"]), 5 * CHUNK, result)
        self.assertLess(result["peak"] - result["base"], MAX_GROWTH, result)


if __name__ == "__main__":
    unittest.main()

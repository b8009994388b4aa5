"""The optimiser of a run: learning-rate schedule, weight decay, SGD / Adam, the projection.

:func:`make_optimizer` wraps the whole ``optax.chain`` in ``optax.inject_hyperparams``: the peak
learning rate (``config.optim.lr``) and, when the projection is on, its radius
(``config.project.max_norm``) live in the optimiser state (``opt_state.hyperparams``) as
float32 arrays instead of being constants of the compiled step, so runs that differ only in them
share one compilation (and a restored state carries them). The projection's other options
(method, rounds, ``project_certify_every`` / ``project_certify_method``, the device mesh) are
static: they come from the (static) ``config`` and ``mesh`` arguments of the chain.
"""

from typing import Any

import jax
import jax.numpy as jnp
import optax

from train.config import TrainConfig
from train.distributed import DATA_AXIS
from train.transforms import project_conv_operator_norm

#: Names of the traced hyperparameters in ``opt_state.hyperparams``.
LEARNING_RATE = "learning_rate"
MAX_NORM = "max_norm"


def learning_rate_schedule(config: TrainConfig, peak: Any = None) -> optax.Schedule:
    """The learning rate as a function of the step: warm-up, then cosine / piecewise / constant.

    ``'cosine'`` decays from the peak to 0 at ``num_steps``; ``'piecewise'`` multiplies the peak
    by ``decay_factor`` at each ``round(b * num_steps)`` for ``b`` in ``boundaries``. A run
    resumed with a new ``num_steps`` continues on the schedule of the new value (see
    :data:`train.checkpoint.SCHEDULE_CHANGES`).

    Args:
      config: the run's configuration (schedule shape and ``lr``).
      peak: the peak learning rate, e.g. a traced scalar (default ``config.optim.lr``).

    Example:
      >>> schedule = learning_rate_schedule(TrainConfig(num_steps=100, schedule='constant'))
      >>> float(schedule(50))
      0.1
    """
    lr = config.optim.lr if peak is None else peak
    decay_steps = max(config.num_steps - config.optim.warmup_steps, 1)
    if config.optim.schedule == "cosine":
        main = optax.cosine_decay_schedule(lr, decay_steps)
    elif config.optim.schedule == "piecewise":
        bounds = {
            max(int(round(b * config.num_steps)) - config.optim.warmup_steps, 1):
                config.optim.decay_factor
            for b in config.optim.boundaries
        }
        main = optax.piecewise_constant_schedule(lr, bounds)
    else:
        main = optax.constant_schedule(lr)
    if config.optim.warmup_steps == 0:
        return main
    warmup = optax.linear_schedule(0.0, lr, config.optim.warmup_steps)
    return optax.join_schedules([warmup, main], [config.optim.warmup_steps])


def _chain(
    learning_rate: Any,
    max_norm: Any,
    *,
    config: TrainConfig,
    specs: Any,
    mesh: jax.sharding.Mesh | None = None,
    folds: tuple = (),
    dense: tuple = (),
) -> optax.GradientTransformation:
    """The inner transformation of :func:`make_optimizer` for given (traced) hyperparameters."""
    schedule = learning_rate_schedule(config, learning_rate)
    parts = []
    if config.optim.weight_decay:
        parts.append(
            optax.add_decayed_weights(
                config.optim.weight_decay, mask=lambda p: jax.tree.map(lambda x: x.ndim > 1, p)
            )
        )
    if config.optim.name == "sgd":
        parts.append(
            optax.sgd(
                schedule, momentum=config.optim.momentum or None,
                nesterov=config.optim.nesterov,
            )
        )
    else:
        parts.append(optax.adam(schedule))
    if max_norm is not None and (folds or dense):
        from train.bn_aware import project_batchnorm_folded
        from train.bn_aware import unfolded_specs

        specs_alone = unfolded_specs(specs, folds)
        if any(s is not None for s in jax.tree.leaves(
                specs_alone, is_leaf=lambda x: x is None or hasattr(x, "input_shape"))):
            parts.append(project_conv_operator_norm(
                max_norm, specs_alone, every_k_steps=config.project.every,
                method=config.project.method, num_rounds=config.project.rounds,
                certify_every=config.project.certify_every,
                certify_method=config.project.certify_method, mesh=mesh, mesh_axis=DATA_AXIS,
            ))
        parts.append(project_batchnorm_folded(
            max_norm, specs, folds, dense=dense, every_k_steps=config.project.every,
            method=config.project.method, num_rounds=max(config.project.rounds, 1),
            certify_every=config.project.certify_every,
            certify_method=config.project.certify_method,
        ))
    elif max_norm is not None:
        parts.append(
            project_conv_operator_norm(
                max_norm,
                specs,
                every_k_steps=config.project.every,
                method=config.project.method,
                num_rounds=config.project.rounds,
                certify_every=config.project.certify_every,
                certify_method=config.project.certify_method,
                mesh=mesh,
                mesh_axis=DATA_AXIS,
            )
        )
    return optax.chain(*parts)


def make_optimizer(
    config: TrainConfig,
    specs: Any = None,
    mesh: jax.sharding.Mesh | None = None,
    *,
    folds: tuple = (),
    dense: tuple = (),
) -> optax.GradientTransformation:
    """``optax.chain(weight decay, SGD-momentum | Adam with the schedule[, projection])``.

    The chain is built by ``optax.inject_hyperparams`` with the hyperparameters
    :data:`LEARNING_RATE` (the peak of :func:`learning_rate_schedule`) and, when
    ``config.project.max_norm`` is set, :data:`MAX_NORM` (the radius of
    :func:`train.project_conv_operator_norm`, last in the chain): both are float32 arrays of
    ``opt_state.hyperparams``, set by ``init`` from ``config``. The projection uses
    ``config.project.method``, ``project_every``, ``project_rounds`` and, when
    ``config.project.certify_every`` is set, a certified rescale
    (``config.project.certify_method``) after every ``project_certify_every``-th update.

    Args:
      config: the run's configuration.
      specs: conv specs with the structure of the params (from :func:`train.find_convs_nnx`);
        needed when ``config.project.max_norm`` is set.
      mesh: a device mesh with the axis :data:`train.distributed.DATA_AXIS` to spread the
        projection's groups of kernels over (``mesh`` of
        :func:`train.project_conv_operator_norm`; same values, less work per device); ``None``:
        no sharding constraint. Only ``update`` uses it: the state of ``init`` does not depend
        on it.
      folds: BatchNorm-aware projection (``config.project.bn_aware``): the conv -> BatchNorm
        pairs (:func:`train.bn_aware.find_batchnorm_folds`) whose folded operators
        :func:`train.bn_aware.project_batchnorm_folded` keeps at ``σ_max <= c`` (appended
        last; the other convs keep :func:`train.project_conv_operator_norm`).
      dense: dense weights projected too (``config.project.lipschitz_target``).

    Returns:
      The transformation; its ``update`` needs ``params`` when the projection is on, and
      ``batch_stats`` (the model's running statistics) with ``folds``.

    Raises:
      ValueError: when ``config.project.max_norm`` is set and ``specs`` is ``None``.

    Example:
      >>> import jax.numpy as jnp
      >>> import spectra
      >>> config = TrainConfig(weight_decay=0.0, momentum=0.0, project_max_norm=1.0,
      ...                      project_method='power', project_certify_every=2)
      >>> params = {'w': jnp.ones((3, 3, 1, 1))}
      >>> specs = {'w': spectra.ConvSpec((8, 8), padding='CIRCULAR')}
      >>> tx = make_optimizer(config, specs)
      >>> state = tx.init(params)
      >>> for _ in range(2):  # The 2nd update is certified.
      ...     updates, state = tx.update({'w': jnp.zeros((3, 3, 1, 1))}, state, params)
      ...     params = optax.apply_updates(params, updates)
      >>> bool(spectra.spectral_norm(params['w'], specs['w'], 'fft') <= 1.0 + 1e-5)
      True
    """
    if config.project.max_norm is not None and specs is None:
        raise ValueError("specs are needed when config.project.max_norm is set")
    factory = optax.inject_hyperparams(
        _chain, static_args=("config", "specs", "mesh", "folds", "dense"),
        hyperparam_dtype=jnp.float32,
    )
    return factory(
        learning_rate=config.optim.lr,
        max_norm=config.project.max_norm,
        config=config,
        specs=specs,
        mesh=mesh,
        folds=tuple(folds),
        dense=tuple(dense),
    )


def current_learning_rate(config: TrainConfig, opt_state: Any, step: Any) -> jax.Array:
    """The learning rate applied at ``step`` by :func:`make_optimizer`'s state ``opt_state``
    (the schedule of ``config`` with the state's peak learning rate)."""
    return learning_rate_schedule(config, opt_state.hyperparams[LEARNING_RATE])(step)

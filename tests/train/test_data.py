"""`train.data`: datasets, augmentation and the resumable, multi-process input pipeline."""

import tempfile

import numpy as np
import tensorflow_datasets as tfds
from absl.testing import absltest
from absl.testing import parameterized

from train import data


def _toy(n=23, shape=(5, 6, 2), seed=0):
    rng = np.random.default_rng(seed)
    images = rng.uniform(0.1, 1.0, size=(n, *shape)).astype(np.float32)
    labels = np.arange(n, dtype=np.int32)  # label = index: lets a test track every example
    return images, labels


def _all_batches(pipe, epoch=0, start_batch=0):
    return list(pipe.batches(epoch, start_batch))


def _seen_labels(batches):
    return np.concatenate([b.labels[b.mask] for b in batches])


class DigitsTest(absltest.TestCase):

    def test_split_sizes_dtypes_ranges(self):
        train_x, train_y = data.load_digits_split("train")
        test_x, test_y = data.load_digits_split("test")
        self.assertEqual(train_x.shape, (1438, 8, 8, 1))
        self.assertEqual(test_x.shape, (359, 8, 8, 1))
        self.assertEqual((train_y.shape, test_y.shape), ((1438,), (359,)))
        self.assertEqual((train_x.dtype, train_y.dtype), (np.float32, np.int32))
        self.assertEqual(float(train_x.min()), 0.0)
        self.assertEqual(float(train_x.max()), 1.0)
        self.assertEqual(set(np.unique(train_y)), set(range(10)))

    def test_split_is_disjoint_covering_stratified_and_fixed(self):
        train_idx, test_idx = data.digits_split_indices()
        self.assertEmpty(np.intersect1d(train_idx, test_idx))
        np.testing.assert_array_equal(
            np.sort(np.concatenate([train_idx, test_idx])), np.arange(1797)
        )
        _, test_y = data.load_digits_split("test")
        counts = np.bincount(test_y, minlength=10)
        self.assertTrue(np.all((counts >= 35) & (counts <= 37)), counts)
        again_train, again_test = data.digits_split_indices()
        np.testing.assert_array_equal(again_test, test_idx)
        np.testing.assert_array_equal(again_train, train_idx)
        # The images are the right ones: same pixels as the underlying data set.
        from sklearn.datasets import load_digits

        raw = load_digits()
        test_x, _ = data.load_digits_split("test")
        np.testing.assert_array_equal(test_x[..., 0] * 16, raw.images[test_idx])
        np.testing.assert_array_equal(test_y, raw.target[test_idx])

    def test_other_seed_and_fraction(self):
        _, test_0 = data.digits_split_indices(seed=0)
        _, test_1 = data.digits_split_indices(seed=1)
        self.assertLen(test_1, 359)
        self.assertFalse(np.array_equal(test_0, test_1))
        images, _ = data.load_digits_split("test", test_fraction=0.5)
        self.assertBetween(len(images), 890, 910)

    def test_bad_arguments(self):
        with self.assertRaisesRegex(ValueError, "split"):
            data.load_digits_split("validation")
        with self.assertRaisesRegex(ValueError, "test_fraction"):
            data.load_digits_split("test", test_fraction=1.0)

    def test_load_split_and_info(self):
        images, labels = data.load_split("digits", "train")
        info = data.dataset_info("digits")
        self.assertEqual(images.shape[1:], info.image_shape)
        self.assertEqual((info.train_size, info.test_size), (1438, 359))
        self.assertEqual(info.num_classes, 10)
        mean, std = data.channel_stats(images)
        np.testing.assert_allclose(info.mean, mean)
        np.testing.assert_allclose(info.std, std)


class DatasetInfoTest(parameterized.TestCase):

    @parameterized.parameters(("cifar10", 10), ("cifar100", 100))
    def test_cifar(self, name, num_classes):
        info = data.dataset_info(name)
        self.assertEqual(info.image_shape, (32, 32, 3))
        self.assertEqual(info.num_classes, num_classes)
        self.assertLen(info.mean, 3)
        self.assertLen(info.std, 3)
        self.assertEqual((info.train_size, info.test_size), (50_000, 10_000))

    def test_unknown(self):
        with self.assertRaisesRegex(ValueError, "name"):
            data.dataset_info("mnist")
        with self.assertRaisesRegex(ValueError, "name"):
            data.load_split("mnist", "train")


class TfdsTest(parameterized.TestCase):

    @parameterized.parameters(("cifar10", 10), ("cifar100", 100))
    def test_mock_data_source(self, name, num_classes):
        # tfds.testing.mock_data supports tfds.data_source (item access) in tfds 4.9.10.
        with tfds.testing.mock_data(num_examples=6):
            images, labels = data.load_tfds_split(name, "train")
        self.assertEqual(images.shape, (6, 32, 32, 3))
        self.assertEqual((images.dtype, labels.dtype), (np.float32, np.int32))
        self.assertTrue(np.all((images >= 0) & (images <= 1)))
        self.assertGreater(float(images.max()), 0.5)  # uint8 -> [0, 1], not left in 0..255/255²
        self.assertTrue(np.all((labels >= 0) & (labels < num_classes)))
        # Same records through load_split.
        with tfds.testing.mock_data(num_examples=6):
            images_2, labels_2 = data.load_split(name, "test")
        np.testing.assert_array_equal(images_2, images)
        np.testing.assert_array_equal(labels_2, labels)

    def test_mock_feeds_pipeline(self):
        with tfds.testing.mock_data(num_examples=10):
            images, labels = data.load_tfds_split("cifar10", "train[:10]")
        pipe = data.Pipeline(images, labels, 4, shuffle=True, crop_pad=4, flip=True)
        batches = _all_batches(pipe)
        self.assertLen(batches, 3)
        self.assertEqual(batches[0].images.shape, (4, 32, 32, 3))

    def test_not_prepared_names_the_fix(self):
        with tempfile.TemporaryDirectory() as empty:
            with self.assertRaisesRegex(data.DatasetNotAvailableError, "tfds build cifar10"):
                data.load_tfds_split("cifar10", "train", data_dir=empty)
            with self.assertRaisesRegex(RuntimeError, "data_dir=DIR"):
                data.load_tfds_split("cifar100", "test", data_dir=empty)

    def test_bad_name(self):
        with self.assertRaisesRegex(ValueError, "name"):
            data.load_tfds_split("digits", "train")


class AugmentationTest(absltest.TestCase):

    def test_channel_stats(self):
        images, _ = _toy(n=50)
        mean, std = data.channel_stats(images)
        np.testing.assert_allclose(mean, images.mean(axis=(0, 1, 2)), rtol=1e-6)
        np.testing.assert_allclose(std, images.std(axis=(0, 1, 2)), rtol=1e-5)
        self.assertEqual(mean.shape, (2,))

    def test_random_crop_is_a_zero_padded_shift(self):
        images, _ = _toy(n=200, shape=(4, 5, 2))
        pad = 2
        out = data.random_crop(images, pad, np.random.default_rng(0))
        self.assertEqual(out.shape, images.shape)
        self.assertEqual(out.dtype, images.dtype)
        padded = np.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
        offsets = set()
        for n in range(len(images)):
            matches = [
                (dy, dx)
                for dy in range(2 * pad + 1)
                for dx in range(2 * pad + 1)
                if np.array_equal(out[n], padded[n, dy : dy + 4, dx : dx + 5])
            ]
            self.assertLen(matches, 1)  # images are > 0, so the shift is unique
            offsets.add(matches[0])
            dy, dx = matches[0]
            # The zeros are exactly where the crop leaves the image.
            rows = np.arange(4) + dy - pad
            cols = np.arange(5) + dx - pad
            outside = ~((rows[:, None] >= 0) & (rows[:, None] < 4) & (cols >= 0) & (cols < 5))
            np.testing.assert_array_equal(out[n][outside], 0)
            self.assertTrue(np.all(out[n][~outside] > 0))
        self.assertLen(offsets, 25)  # every offset occurs
        self.assertIs(data.random_crop(images, 0, np.random.default_rng(0)), images)

    def test_random_flip(self):
        images, _ = _toy(n=64)
        out = data.random_flip(images, np.random.default_rng(0))
        flipped = np.array([np.array_equal(o, x[:, ::-1]) for o, x in zip(out, images)])
        kept = np.array([np.array_equal(o, x) for o, x in zip(out, images)])
        self.assertTrue(np.all(flipped ^ kept))
        self.assertBetween(int(flipped.sum()), 16, 48)


class PipelineTest(parameterized.TestCase):

    def test_eval_order_every_example_once(self):
        images, labels = _toy(n=23)
        pipe = data.Pipeline(images, labels, 5, normalize=False)
        batches = _all_batches(pipe)
        self.assertLen(batches, 5)
        self.assertEqual(len(pipe), 5)
        for b in batches:
            self.assertEqual(b.images.shape, (5, 5, 6, 2))
            self.assertEqual((b.images.dtype, b.labels.dtype, b.mask.dtype),
                             (np.float32, np.int32, bool))
        np.testing.assert_array_equal(batches[-1].mask, [True, True, True, False, False])
        np.testing.assert_array_equal(batches[-1].images[3:], 0)
        np.testing.assert_array_equal(_seen_labels(batches), labels)  # in order, once each
        np.testing.assert_array_equal(
            np.concatenate([b.images[b.mask] for b in batches]), images
        )

    def test_exact_multiple_has_no_padding(self):
        images, labels = _toy(n=20)
        batches = _all_batches(data.Pipeline(images, labels, 5))
        self.assertLen(batches, 4)
        self.assertTrue(all(b.mask.all() for b in batches))

    def test_drop_remainder(self):
        images, labels = _toy(n=23)
        pipe = data.Pipeline(images, labels, 5, shuffle=True, drop_remainder=True)
        batches = _all_batches(pipe, epoch=3)
        self.assertLen(batches, 4)
        self.assertTrue(all(b.mask.all() for b in batches))
        seen = _seen_labels(batches)
        self.assertLen(np.unique(seen), 20)
        with self.assertRaisesRegex(ValueError, "batch_size"):
            data.Pipeline(images, labels, 24, drop_remainder=True)

    def test_normalisation(self):
        images, labels = _toy(n=40)
        pipe = data.Pipeline(images, labels, 16)
        mean, std = data.channel_stats(images)
        np.testing.assert_allclose(pipe.mean, mean)
        np.testing.assert_allclose(pipe.std, std)
        seen = np.concatenate([b.images[b.mask] for b in pipe.batches(0)])
        np.testing.assert_allclose(seen.mean(axis=(0, 1, 2)), 0, atol=1e-5)
        np.testing.assert_allclose(seen.std(axis=(0, 1, 2)), 1, atol=1e-4)
        np.testing.assert_allclose(seen, (images - mean) / std, rtol=1e-6)
        # Given statistics (an evaluation pipeline uses the train split's).
        given = data.Pipeline(images, labels, 16, mean=[0.5, 0.25], std=2.0)
        batch = next(given.batches(0))
        np.testing.assert_allclose(batch.images, (images[:16] - [0.5, 0.25]) / 2.0, rtol=1e-6)
        raw = next(data.Pipeline(images, labels, 16, normalize=False).batches(0))
        np.testing.assert_array_equal(raw.images, images[:16])

    def test_augmentation_pads_with_zero_after_normalising(self):
        images, labels = _toy(n=12)
        pipe = data.Pipeline(images, labels, 4, shuffle=True, seed=5, crop_pad=1, flip=True)
        epoch, b = 2, 1
        batch = _all_batches(pipe, epoch)[b]
        # The documented recipe: order from (seed, epoch), augmentation rng from
        # (seed, epoch, process_index, b), normalise, crop, flip.
        index = np.random.default_rng([5, epoch]).permutation(12)[4:8]
        rng = np.random.default_rng([5, epoch, 0, b])
        expected = data.random_crop((images[index] - pipe.mean) / pipe.std, 1, rng)
        expected = data.random_flip(expected, rng)
        np.testing.assert_array_equal(batch.images, expected)
        np.testing.assert_array_equal(batch.labels, index)

    def test_deterministic_per_seed_and_epoch(self):
        images, labels = _toy(n=23)
        make = lambda seed: data.Pipeline(  # noqa: E731
            images, labels, 4, shuffle=True, seed=seed, crop_pad=2, flip=True
        )
        first = _all_batches(make(7), epoch=3)
        again = _all_batches(make(7), epoch=3)
        for a, b in zip(first, again):
            np.testing.assert_array_equal(a.images, b.images)
            np.testing.assert_array_equal(a.labels, b.labels)
        other_epoch = _seen_labels(_all_batches(make(7), epoch=4))
        other_seed = _seen_labels(_all_batches(make(8), epoch=3))
        self.assertFalse(np.array_equal(_seen_labels(first), other_epoch))
        self.assertFalse(np.array_equal(_seen_labels(first), other_seed))
        # Each epoch is a permutation: every example once.
        np.testing.assert_array_equal(np.sort(other_epoch), labels)

    def test_resume_inside_an_epoch(self):
        images, labels = _toy(n=23)
        pipe = data.Pipeline(images, labels, 4, shuffle=True, seed=3, crop_pad=1, flip=True)
        full = _all_batches(pipe, epoch=2)
        resumed = _all_batches(
            data.Pipeline(images, labels, 4, shuffle=True, seed=3, crop_pad=1, flip=True),
            *pipe.position(2 * pipe.num_batches + 4),
        )
        self.assertLen(resumed, len(full) - 4)
        for a, b in zip(full[4:], resumed):
            np.testing.assert_array_equal(a.images, b.images)
            np.testing.assert_array_equal(a.labels, b.labels)
            np.testing.assert_array_equal(a.mask, b.mask)
        self.assertEqual(pipe.position(13), (2, 1))
        self.assertEmpty(_all_batches(pipe, 0, pipe.num_batches))
        with self.assertRaisesRegex(ValueError, "start_batch"):
            _all_batches(pipe, 0, pipe.num_batches + 1)

    @parameterized.parameters(
        dict(n=23, batch_size=4, count=3, shuffle=False),
        dict(n=23, batch_size=4, count=3, shuffle=True),
        dict(n=24, batch_size=5, count=4, shuffle=True),
        dict(n=5, batch_size=4, count=8, shuffle=False),  # more processes than some shards
    )
    def test_process_shards_disjoint_and_covering(self, n, batch_size, count, shuffle):
        images, labels = _toy(n=n)
        shards, lengths = [], set()
        for index in range(count):
            pipe = data.Pipeline(
                images, labels, batch_size, shuffle=shuffle, seed=1, crop_pad=1,
                process_index=index, process_count=count,
            )
            batches = _all_batches(pipe, epoch=1)
            lengths.add(len(batches))
            shards.append(_seen_labels(batches))
        self.assertLen(lengths, 1)  # every process runs the same number of steps
        everything = np.concatenate(shards)
        np.testing.assert_array_equal(np.sort(everything), labels)  # disjoint and covering

    def test_bad_arguments(self):
        images, labels = _toy(n=8)
        for kwargs, name in [
            (dict(batch_size=0), "batch_size"),
            (dict(seed=-1), "seed"),
            (dict(crop_pad=-1), "crop_pad"),
            (dict(process_index=2, process_count=2), "process_index"),
            (dict(std=0.0), "std"),
        ]:
            args = dict(batch_size=4) | kwargs
            with self.assertRaisesRegex(ValueError, name):
                data.Pipeline(images, labels, **args)
        with self.assertRaisesRegex(ValueError, "labels"):
            data.Pipeline(images, labels[:-1], 4)
        with self.assertRaisesRegex(ValueError, "images"):
            data.Pipeline(images[..., 0], labels, 4)

    def test_digits_pipeline_speed_and_shapes(self):
        images, labels = data.load_digits_split("train")
        pipe = data.Pipeline(images, labels, 128, shuffle=True, crop_pad=2, drop_remainder=True)
        batches = _all_batches(pipe, epoch=0)
        self.assertLen(batches, 1438 // 128)
        self.assertEqual(batches[0].images.shape, (128, 8, 8, 1))


if __name__ == "__main__":
    absltest.main()

"""
Real-data loaders: MNIST, FashionMNIST and CIFAR-10 through torchvision's dataset classes.

The course runs on the procedural Shapes dataset, offline. These loaders are for users who already
have the files (or a connection): every image comes out like a Shapes image, a float tensor in
[-1, 1] of shape (C, resolution, resolution), so the same models train on either.

    ds = load_real("mnist", "datasets/raw", channels=3)   # (3, 32, 32) images, int labels
    image, label = ds[0]

Nothing is downloaded unless you pass download=True. `datasets/raw/` is the git-ignored place for
these files in this repository.
"""

import os

import torchvision.datasets as tvd
import torchvision.transforms as T


class CIFAR10Files(tvd.CIFAR10):
    """torchvision's CIFAR10, checking that the batch files exist rather than their md5 sums.

    torchvision compares every batch file with the md5 of the official release, which rejects a
    re-packed copy and the tiny files our tests write. Here only existence is checked; with
    download=True torchvision still verifies the md5 of the archive it fetches.
    Note: CIFAR batches are Python pickles (the format the dataset's authors chose, and what
    torchvision reads). Unpickling can run code from the file, so only read files you trust:
    the official release or your own copy.
    """

    train_list = [[filename, None] for filename, _ in tvd.CIFAR10.train_list]  # md5 None: existence only
    test_list = [[filename, None] for filename, _ in tvd.CIFAR10.test_list]
    meta = {**tvd.CIFAR10.meta, "md5": None}


DATASET_CLASSES = {"mnist": tvd.MNIST, "fashion_mnist": tvd.FashionMNIST, "cifar10": CIFAR10Files}
NATIVE_CHANNELS = {"mnist": 1, "fashion_mnist": 1, "cifar10": 3}
CLASS_NAMES = {
    "mnist": ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"],
    "fashion_mnist": ["t-shirt", "trouser", "pullover", "dress", "coat",
                      "sandal", "shirt", "sneaker", "bag", "ankle boot"],
    "cifar10": ["airplane", "automobile", "bird", "cat", "deer",
                "dog", "frog", "horse", "ship", "truck"],
}
SPLITS = ("train", "test")


def _check_name(name):
    if name not in DATASET_CLASSES:
        raise ValueError(f"unknown dataset {name!r}; choose one of {sorted(DATASET_CLASSES)}")


def class_names(name):
    """The 10 class names of a dataset, indexed by label."""
    _check_name(name)
    return list(CLASS_NAMES[name])


def expected_files(name, root):
    """The files torchvision needs under root for this dataset (all splits: it checks them all)."""
    _check_name(name)
    if name == "cifar10":
        folder = os.path.join(root, CIFAR10Files.base_folder)
        filenames = [f for f, _ in CIFAR10Files.train_list + CIFAR10Files.test_list] + [CIFAR10Files.meta["filename"]]
    else:
        folder = os.path.join(root, DATASET_CLASSES[name].__name__, "raw")  # e.g. <root>/MNIST/raw/
        filenames = [f"{split}-{kind}-ubyte" for split in ("train", "t10k") for kind in ("images-idx3", "labels-idx1")]
    return [os.path.join(folder, filename) for filename in filenames]


def make_transform(name, resolution=32, channels=None):
    """PIL image -> float tensor in [-1, 1] of shape (channels, resolution, resolution)."""
    _check_name(name)
    channels = NATIVE_CHANNELS[name] if channels is None else channels
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1, 3 or None (native), got {channels}")
    if resolution < 8:
        raise ValueError(f"resolution must be >= 8, got {resolution}")
    steps = []
    if name in ("mnist", "fashion_mnist"):
        steps.append(T.Pad(2, fill=0))  # 28x28 -> 32x32 with a black border (LeNet-5's layout): objects stay sharp
    if resolution != 32:
        steps.append(T.Resize(resolution, antialias=True))
    if channels != NATIVE_CHANNELS[name]:
        steps.append(T.Grayscale(num_output_channels=channels))  # gray -> RGB repeats; RGB -> gray uses luma
    steps.append(T.ToTensor())  # uint8 [0, 255] -> float [0, 1]
    steps.append(T.Normalize([0.5] * channels, [0.5] * channels))  # x' = (x - 0.5) / 0.5: [0, 1] -> [-1, 1]
    return T.Compose(steps)


def load_real(name, root, split="train", resolution=32, channels=None, download=False):
    """A torchvision Dataset of (image, label): image in [-1, 1], shape (C, resolution, resolution).

    name: "mnist", "fashion_mnist" or "cifar10". channels: None keeps the native count (1 for the
    MNIST family, 3 for CIFAR-10); 3 repeats grayscale into RGB, 1 converts colour to grayscale.
    download: fetch the files from the internet if they are missing (off by default).
    """
    _check_name(name)
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    transform = make_transform(name, resolution, channels)
    if not download:
        missing = [path for path in expected_files(name, root) if not os.path.isfile(path)]
        if missing:
            raise FileNotFoundError(
                f"{name} files not found; expected under {os.path.dirname(missing[0])}: "
                f"{', '.join(os.path.basename(p) for p in missing)}. "
                f"Put the files there, or pass download=True to fetch them (needs an internet connection).")
    return DATASET_CLASSES[name](root, train=(split == "train"), transform=transform, download=download)

"""Models (CIFAR ResNets, torchvision, the digits demo, user files), checkpoints and datasets."""

from rankfold.models.checkpoint import check_finite, load_weights, read_state_dict, sha256_file
from rankfold.models.data import (
    ArrayDataset,
    DatasetView,
    ImageData,
    ImageFolderDataset,
    batches,
    data_dir,
    eval_transform,
    first_images,
    load_dataset,
    load_image,
    normalize,
    read_groups,
    read_idx,
    shared_file,
    training_batches,
)
from rankfold.models.digits import (
    DIGITS_SPEC,
    DigitsCNN,
    digits_splits,
    train_digits_cnn,
)
from rankfold.models.spec import ModelSpec
from rankfold.models.zoo import SHARED_CHECKPOINTS, list_models, load_model, register_model

__all__ = [
    "DIGITS_SPEC",
    "SHARED_CHECKPOINTS",
    "ArrayDataset",
    "DatasetView",
    "DigitsCNN",
    "ImageData",
    "ImageFolderDataset",
    "ModelSpec",
    "batches",
    "check_finite",
    "data_dir",
    "digits_splits",
    "eval_transform",
    "first_images",
    "list_models",
    "load_dataset",
    "load_image",
    "load_model",
    "load_weights",
    "normalize",
    "read_groups",
    "read_idx",
    "read_state_dict",
    "register_model",
    "sha256_file",
    "shared_file",
    "train_digits_cnn",
    "training_batches",
]

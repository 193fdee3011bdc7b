"""Stage 3, preprocess: the IDX files in --raw to compact uint8 arrays with a seeded validation split, in --prepared."""

from mnist_pipeline.dataset import load_dataset
from mnist_pipeline.errors import run_stage
from mnist_pipeline.params import load_params
from mnist_pipeline.paths import PREPARED_DIR, RAW_DIR, stage_paths
from mnist_pipeline.prepared import prepared_meta, save_prepared, split_indices


def main(argv: list[str] | None = None) -> None:
    paths = stage_paths(__doc__, argv, raw=RAW_DIR, prepared=PREPARED_DIR)
    all_params = load_params()
    params, dataset = all_params.preprocess, all_params.dataset
    (images, labels), test = load_dataset(dataset, paths.raw)
    train, val = split_indices(len(images), params.val_size, params.train_limit, params.seed)
    splits = {"train": (images[train], labels[train]), "val": (images[val], labels[val]), "test": test}
    save_prepared(paths.prepared, splits, prepared_meta(splits, dataset.class_names))
    print(", ".join(f"{name}: {len(split_labels)}" for name, (_, split_labels) in splits.items()))


if __name__ == "__main__":
    run_stage(main)

"""Paper scale: check that the datasets and pretrained weights the experiments of a dataset need
are where their configs say, before anything is submitted (compute nodes are often offline).

    python workflow/scripts/check_inputs.py --scale paper --dataset coco_panoptic

Exits 2 with one line per missing thing (the experiments that need it, and how to fix it).
"""

import argparse
import os
import sys
from pathlib import Path

from hcformer.experiments import all_experiments


def hub_cache() -> Path:
    """Where huggingface_hub (timm's download path) keeps its files."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    home = os.environ.get("HF_HOME") or os.path.join(
        os.path.expanduser("~"), ".cache", "huggingface"
    )
    return Path(home) / "hub"


def weights_present(spec: str) -> tuple[bool, str]:
    """Whether a ``pretrained`` value of a backbone config can be loaded without the network."""
    if spec.startswith("timm:"):
        name = spec.removeprefix("timm:")
        folder = hub_cache() / f"models--timm--{name}"
        return folder.is_dir(), (
            f'{folder} (download on a machine with network: python -c "import timm; '
            f"timm.create_model('{name}', pretrained=True)\", with the same HF_HOME)"
        )
    return Path(spec).is_file(), spec


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", default="paper")
    parser.add_argument("--dataset", required=True)
    args = parser.parse_args()
    missing: dict[str, list[str]] = {}
    for exp in all_experiments(args.scale).values():
        if exp.dataset != args.dataset:
            continue
        root = Path(exp.config.data.root)
        if not root.is_dir():
            where = f"dataset folder {root} (data.root of {args.dataset}; see docs/pipeline.md)"
            missing.setdefault(where, []).append(exp.id)
        spec = exp.config.model.backbone.pretrained
        if spec:
            ok, where = weights_present(spec)
            if not ok:
                missing.setdefault(f"pretrained weights {where}", []).append(exp.id)
    for what, users in missing.items():
        print(
            f"check_inputs: missing {what}: needed by {len(users)} experiment(s), e.g. {users[0]}",
            file=sys.stderr,
        )
    if missing:
        return 2
    print(f"check_inputs: {args.dataset}: every dataset folder and pretrained weight is present")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Does a model's text conditioning carry the findings its reports name? A linear probe on the text tower.

    python benchmarks/phantom_model/probe_text.py --model text2ct_engine/assets/phantom_model \
        --data runs/phantom_model/phantom --json benchmarks/phantom_model/probe.json

Embeds every report of the data's train and valid splits with the model's text tower (the UNet's
cross-attention context), fits one logistic regression per finding label on the training embeddings
(``text2ct_engine.evaluate.probe.linear_probe``) and prints its held-out accuracy beside the majority answer's.
A probe at the majority means the UNet is given nothing to follow. ``--model``: a model directory or
``train clip``'s ``out/model`` (both hold clip/ + tokenizer.json).
"""
from __future__ import annotations

import argparse
import sys

import torch

from text2ct_engine.cli import check_output_file, run_guarded
from text2ct_engine.data.ctrate import CTRATEDataset
from text2ct_engine.data.errors import DataError
from text2ct_engine.data.labels import CTRATE_LABELS
from text2ct_engine.evaluate.probe import linear_probe
from text2ct_engine.io_utils import write_json
from text2ct_engine.text import encode_prompts, load_text_side


def reports(root: str, split: str) -> tuple[list[str], torch.Tensor]:
    try:
        records = CTRATEDataset(root, split, None, None, "resize", verbose=False).records
    except DataError as err:
        raise ValueError(str(err)) from None
    if not records or any(r.labels is None for r in records):
        raise ValueError(f"{root}: the {split} split needs reports with finding labels (multi_abnormality_labels)")
    return [r.text for r in records], torch.tensor([r.labels for r in records], dtype=torch.float64)


@torch.no_grad()
def embed(encoder, tokenizer, texts: list[str], batch: int = 64) -> torch.Tensor:
    return torch.cat([encode_prompts(encoder, tokenizer, texts[i:i + batch], torch.device("cpu"))[:, 0]
                      for i in range(0, len(texts), batch)]).double()


def run(args: argparse.Namespace) -> None:
    if args.json:
        check_output_file("--json", args.json, args.force)
    (train_t, train_y), (valid_t, valid_y) = reports(args.data, "train"), reports(args.data, "valid")
    encoder, tokenizer = load_text_side(args.model, torch.device("cpu"))
    out = linear_probe(embed(encoder, tokenizer, train_t), train_y, embed(encoder, tokenizer, valid_t), valid_y)
    rows = [{"label": CTRATE_LABELS[k], "accuracy": a, "majority": m}
            for k, a, m in zip(out["kept"], out["accuracy"], out["majority"])]
    print(f"{len(train_t)} training / {len(valid_t)} held-out reports; {args.model}")
    print(f"{'finding':38s} {'probe':>7s} {'majority':>9s}")
    for r in rows:
        print(f"{r['label']:38s} {r['accuracy']:7.1%} {r['majority']:9.1%}")
    mean = {k: sum(r[k] for r in rows) / len(rows) for k in ("accuracy", "majority")}
    print(f"{'mean':38s} {mean['accuracy']:7.1%} {mean['majority']:9.1%}")
    if args.json:
        write_json(args.json, {"model": args.model, "data": args.data, "n_train": len(train_t),
                               "n_valid": len(valid_t), "rows": rows, "mean": mean})
        print(f"wrote {args.json}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="directory with clip/ and tokenizer.json")
    p.add_argument("--data", required=True, help="CT-RATE-layout folder with train and valid splits and labels")
    p.add_argument("--json", help="also write the figures to this JSON file")
    p.add_argument("--force", action="store_true", help="overwrite an existing --json file")
    return run_guarded(lambda: run(p.parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())

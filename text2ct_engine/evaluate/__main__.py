"""``python -m text2ct_engine.evaluate``: score generated CT volumes against real ones, offline.

    python -m text2ct_engine.evaluate --generated out/ --prompts prompts.txt --real data/phantom \\
        --clip runs/clip/model --json eval.json

A folder is in CT-RATE's layout (CT-RATE, or ``python -m text2ct_engine.data.phantom``) or holds the
NIfTIs of ``python -m text2ct_engine.sample`` with their prompts (``--prompts``, or prompts.csv/prompts.txt
in it; see ``evaluate/volume_sets.py``). Prints a table and writes the full result as JSON.
"""
from __future__ import annotations

import argparse
import sys

from ..cli import Parser, check_output_file, run_guarded, path as cli_path
from ..io_utils import write_json
from .evaluation import METRICS, EvalOptions, evaluate, parse_metrics
from .report import format_report


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = Parser(prog="python -m text2ct_engine.evaluate", description=__doc__.split("\n\n")[0])
    p.add_argument("--generated", type=cli_path, required=True,
                   help="generated volumes: CT-RATE layout or a folder of NIfTIs")
    p.add_argument("--real", type=cli_path, required=True, help="real volumes: CT-RATE layout (or a folder of NIfTIs)")
    p.add_argument("--prompts", type=cli_path,
                   help="prompts of a --generated NIfTI folder: .txt (one per line, in file-name "
                                     "order) or .csv (file, prompt[, CT-RATE's 18 label columns])")
    p.add_argument("--clip", type=cli_path,
                   help="CLIP3D directory (OUT/model of python -m text2ct_engine.train clip): needed "
                                  "by fid and clip")
    p.add_argument("--tokenizer", type=cli_path, help="tokenizer.json of the CLIP (default: in or beside --clip)")
    p.add_argument("--clip-spacing", type=float, nargs=3, metavar=("SX", "SY", "SZ"),
                   help="resample to this spacing before the volume tower, as train clip's --spacing "
                        "(default: what the CLIP directory records)")
    p.add_argument("--clip-resize", choices=("resize", "crop_pad"), default=None,
                   help="as train clip's --resize (default: what the CLIP directory records, else resize)")
    p.add_argument("--metrics", help=f"comma-separated subset of {','.join(METRICS)} (default: all the inputs "
                                     f"allow)")
    p.add_argument("--split", choices=("auto", "train", "valid"), default="auto",
                   help="split of a CT-RATE-layout folder (auto: valid if present, else train)")
    p.add_argument("--json", type=cli_path,
                   help="write the full result here (atomically; an existing file needs --force)")
    p.add_argument("--force", action="store_true", help="overwrite an existing --json file")
    p.add_argument("--workers", type=int, default=0, help="processes reading and measuring volumes")
    p.add_argument("--device", default="auto", help="device of the CLIP (auto, cpu, cuda)")
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def run(args: argparse.Namespace) -> None:
    if args.workers < 0:
        raise ValueError(f"--workers must be >= 0, got {args.workers}")
    if args.json:
        check_output_file("--json", args.json, args.force)
    opts = EvalOptions(metrics=parse_metrics(args.metrics), clip=args.clip, tokenizer=args.tokenizer,
                       clip_spacing=args.clip_spacing, clip_resize=args.clip_resize, split=args.split,
                       prompts=args.prompts, workers=args.workers, device=args.device)
    result = evaluate(args.generated, args.real, opts, progress=not args.no_progress)
    print(format_report(result))
    if args.json:
        write_json(args.json, result)
        print(f"wrote {args.json}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return run_guarded(lambda: run(args))


if __name__ == "__main__":
    sys.exit(main())

"""The README speed table from the JSON files of ``benchmarks/speed_table.sh``.

Usage: python benchmarks/speed_table.py OUT_DIR [--write README.md]
(prints the markdown table; ``--write`` also replaces the table between the README's
``<!-- speed-table:start -->`` and ``<!-- speed-table:end -->`` markers.)
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from factorlab.io import write_marked_block

RUNTIMES = {"torch": "PyTorch eager, fp32", "onnxruntime": "ONNX Runtime, fp32"}
RUNTIMES["onnxruntimeint8"] = "ONNX Runtime, int8"
MODELS = {"dense": "1 (dense)", "low-rank-0.5": "0.5", "low-rank-0.25": "0.25"}
START, END = "<!-- speed-table:start -->", "<!-- speed-table:end -->"


def table(folder: Path) -> str:
    """The markdown table of the bench results in ``folder`` (every one must be there)."""
    lines = [
        "| runtime | batch | param_ratio | ms | dense ms | x dense | ideal x | vs ideal | bytes |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    results = {}
    for tag in RUNTIMES:
        for model in MODELS:
            path = folder / f"{model}.{tag}.json"
            if not path.exists():
                raise SystemExit(f"{path} is missing: run benchmarks/speed_table.sh {folder}")
            results[tag, model] = json.loads(path.read_text())
    loads = []
    for tag, runtime in RUNTIMES.items():
        for batch in (1, 32):
            for model, ratio in MODELS.items():
                result = results[tag, model]
                env = result["environment"]
                loads += [env.get("loadavg_1m"), env.get("loadavg_1m_after")]
                (b,) = [b for b in result["batches"] if b["batch_size"] == batch]
                limit = b.get("limit")
                ideal = "-" if not limit else f"{limit['ideal_ratio']:.3f}"
                vs_ideal = "-" if not b.get("ratio_to_ideal") else f"{b['ratio_to_ideal']:.2f}"
                mib = b["model"]["param_bytes"] / 2**20
                dense_ms = "-" if model == "dense" else f"{1e3 * b['dense']['median_s']:.1f}"
                lines.append(
                    f"| {runtime} | {batch} | {ratio} | {1e3 * b['model']['median_s']:.1f} | "
                    f"{dense_ms} | {b['latency_ratio']:.3f} | {ideal} | {vs_ideal} | "
                    f"{mib:.1f} MiB |"
                )
    known = [x for x in loads if x is not None]
    lines.append("")
    lines.append(
        f"(`factorlab bench`, seq 128, {results['torch', 'dense']['threads']} threads, "
        f"{results['torch', 'dense']['runs']} runs; a factorized model's runs interleave with "
        "its dense reference's (`dense ms`, the base of `x dense`), a dense row is the model "
        f"alone; 1-minute load average {min(known):.2f}-{max(known):.2f} during the benches.)"
    )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("--write", type=Path, help="the README to write the table into")
    args = parser.parse_args()
    text = table(args.folder)
    print(text)
    if args.write:
        write_marked_block(args.write, (START, END), text)


if __name__ == "__main__":
    main()

"""Every malformed input of tests/bad_inputs.py as a real ``sora-train`` / ``sora-merge`` /
``sora-export`` subprocess, with a timeout; prints one line per case and the counts per outcome:

- clear: exit code 2 and one ``error:`` line naming the file/key/row/tensor, nothing changed;
- traceback: a Python traceback reached the user;
- unclear: an error, but not one line naming what is wrong;
- silent: exit code 0 (the bad input was accepted);
- hang: still running at the timeout;
- overwrite: a file of the case folder or the model folder changed.

    python benchmarks/bad_input_fuzz.py [--timeout 60] [--only SUBSTRING] [--jsonl results.jsonl]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from bad_inputs import ALL_CASES, build, judge, run_subprocess, tree_hash  # noqa: E402
from helpers import save_tiny_model, tiny_llama  # noqa: E402

from sora_dist import SoRAConfig, inject_sora, save_sora  # noqa: E402

OUTCOMES = ("clear", "unclear", "traceback", "silent", "hang", "overwrite")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--timeout", type=float, default=60, help="seconds before a case counts as a hang")
    parser.add_argument("--only", default="", help="run the cases whose id contains this text")
    parser.add_argument("--jsonl", help="also write one JSON line per case here")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="sora-fuzz-") as tmp:
        root = Path(tmp)
        model = save_tiny_model(root / "model", tiny_llama(seed=0))
        adapted = tiny_llama(seed=0)
        inject_sora(adapted, SoRAConfig(r=4, target_modules=["q_proj", "v_proj"]), verbose=False)
        save_sora(adapted, root / "adapter")
        cases = [case for case in ALL_CASES if args.only in case.id]
        counts: Counter = Counter()
        by_category: dict[str, Counter] = {}
        out = open(args.jsonl, "w") if args.jsonl else None
        for i, case in enumerate(cases):
            folder = root / f"case{i:03d}"
            argv = build(case, folder, model, root / "adapter")
            before = tree_hash(folder, model)
            start = time.perf_counter()
            code, err = run_subprocess(case, argv, timeout=args.timeout)
            outcome = judge(case, code, err, before, tree_hash(folder, model))
            seconds = time.perf_counter() - start
            counts[outcome] += 1
            by_category.setdefault(case.category, Counter())[outcome] += 1
            last = (err.strip().splitlines() or [""])[-1][:150]
            print(f"{outcome:9s} {seconds:5.1f}s {case.id}: {last}", flush=True)
            if out:
                out.write(json.dumps({"case": case.id, "category": case.category, "outcome": outcome, "exit": code,
                                      "seconds": round(seconds, 2), "stderr_tail": err[-2000:]}) + "\n")  # fmt: skip
        if out:
            out.close()
    print(f"\n{len(cases)} cases: " + ", ".join(f"{name} {counts[name]}" for name in OUTCOMES))
    for category, got in sorted(by_category.items()):
        print(f"  {category:8s} " + ", ".join(f"{name} {got[name]}" for name in OUTCOMES if got[name]))


if __name__ == "__main__":
    main()

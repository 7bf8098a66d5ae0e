"""Wall time and peak memory of ``memaudit demo`` for each bundled setting, side by side: RESULTS.md section 16.

Each demo runs as its own process under ``/usr/bin/time -v`` (wall clock and the kernel's maximum resident set
size), one after the other, with a fresh output folder under ``--work``; the target is 3 minutes on two CPU cores.

    python benchmarks/demo_time.py [--settings faces,fashion] [--models full_ft]    # about 7 minutes here
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from common import audit_row, machine, markdown_table

from memaudit.core.io import atomic_write_json
from memaudit.core.provenance import versions
from memaudit.demo.settings import SETTINGS

HERE = Path(__file__).resolve().parent
TARGET_S = 180.0


def timed_demo(setting: str, model: str, out: Path) -> dict:
    """Run ``memaudit demo`` once; its wall time, peak RSS and summary."""
    cmd = ["/usr/bin/time", "-v", sys.executable, "-m", "memaudit", "demo", "--setting", setting, "--model", model,
           "--out", str(out), "--device", "cpu"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd[2:])} failed:\n{proc.stderr[-2000:]}")
    wall = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): (\S+)", proc.stderr).group(1)
    seconds = sum(float(part) * 60 ** k for k, part in enumerate(reversed(wall.split(":"))))
    rss_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr).group(1))
    results = json.loads((out / "results.json").read_text())
    return {"setting": setting, "model": model, "wall_s": seconds, "max_rss_mib": rss_kb / 1024,
            "of_target": seconds / TARGET_S, "extracted": results["summary"]["extracted_prompts"],
            **audit_row(results)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--settings", default="faces,fashion")
    ap.add_argument("--models", default="full_ft")
    ap.add_argument("--out", type=Path, default=HERE / "demo_time.json")
    args = ap.parse_args(argv)
    for setting in args.settings.split(","):
        if setting not in SETTINGS:
            ap.error(f"--settings {setting}: not a bundled setting; use {', '.join(SETTINGS)}")
        for model in args.models.split(","):
            if model not in SETTINGS[setting].models:
                ap.error(f"--models {model}: {setting} has {', '.join(SETTINGS[setting].models)}")
    rows = []
    with tempfile.TemporaryDirectory(prefix="memaudit-demo-time-") as tmp:
        for setting in args.settings.split(","):
            for model in args.models.split(","):
                out = Path(tmp) / f"{setting}-{model}"
                rows.append(timed_demo(setting, model, out))
                shutil.rmtree(out)
    record = {"command": "python benchmarks/demo_time.py " + " ".join(argv or sys.argv[1:]),
              "machine": machine("cpu"), "versions": versions(), "target_s": TARGET_S, "rows": rows}
    atomic_write_json(args.out, record)
    columns = [("setting", lambda r: r["setting"]), ("model", lambda r: r["model"]),
               ("prompts", lambda r: str(r["prompts"])),
               ("flagged / extracted", lambda r: f"{r['flagged_prompts']} / {r['extracted']}"),
               ("KID", "kid"), ("alignment", "alignment"),
               ("wall s", lambda r: f"{r['wall_s']:.0f}"), ("of the 3-minute target", lambda r: f"{r['of_target']:.2f}"),
               ("peak RSS MiB", lambda r: f"{r['max_rss_mib']:.0f}")]
    print(f"Machine: {record['machine']}\n\n" + markdown_table(rows, columns))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Memory and time of memaudit at real dataset sizes: 512-px training folders of 1,000 to 16,000 images on disk.

Everything is built in ``--work`` (default /tmp/memaudit-scale) and reused by a rerun: one synthetic folder of
512-px PNGs (smooth, unique: a few random low-frequency sinusoids per colour channel, seeded per image; built once,
for the largest size, in ``--gen-workers`` processes, resumed file by file), ``captions-N.csv`` files listing its
first N images, and the pipelines. Parts (``--part``, comma-separated or repeatable; ``all``, the default, runs every
part in this order):

``audit``
    ``memaudit audit`` of a tiny 512-px pipeline built in code (VAE channels 8, 16, 16, 16: latents 64x64; UNet
    channels 8, 16, cross-attention at 32x32 only) against the first N images, for each N of ``--sizes``: 2 prompts
    x 2 generations x 2 steps, batch 4, on the CPU, with a fresh ``--cache-dir`` so that the training features are
    computed, not read back. Each run is a fresh process started with ``MEMAUDIT_THREADS=--threads``; it reports
    its own peak RSS (``VmHWM`` of /proc/self/status, the number the targets judge: the kernel's high-water mark of
    the process image; ``getrusage(RUSAGE_SELF).ru_maxrss`` is recorded too, but it survives ``exec`` and so carries
    the launching process's peak), the number of DataLoader
    workers it forked and its largest finished child's (``RUSAGE_CHILDREN``: forks count the pages they share with
    the main process, so the two do not add up), and the wall time of the command. Its process tree is also
    sampled from /proc every 0.5 s: the workers' private memory and the PSS of the whole tree. Targets: peak RSS at
    the largest size within 1.25x of that at the smallest, and under 4 GB.
``finetune``
    ``memaudit finetune`` of the same pipeline with an on-disk latent cache (``--cache-dir``): a 1-step run that
    builds the cache (shown as "cache build"), then the measured ``--finetune-steps`` run (batch 4) that reads it,
    each in a fresh process, measured as above. The sizes share one cache folder and run in increasing order, so a
    size's build encodes only the images the smaller sizes did not (as a search's proxy split reuses its set's). Target: peak RSS at the largest size within 1.25x of the smallest.
    Skipped, with a line saying so, when ``memaudit finetune --help`` lists no ``--cache-dir``.
``throughput``
    Feature extraction from disk against in memory, same extractor, same images (the first ``--throughput-images``):
    in memory, every image is decoded first (untimed; float32, 3 MB per image) and the extractor is timed over
    batches of 64; from disk, ``for idx, images in ds.batches(64): extractor((images + 1) / 2)`` is timed with the
    default DataLoader workers. The files are in the page cache (the in-memory pass has just read them). Two
    extractors through :func:`memaudit.features.get_extractor`: ``pixels`` (cheap, so decoding dominates) and
    ``torchscript`` with a torchvision ResNet-50 of random weights (``weights=None``, classifier removed: 2,048-d),
    scripted and saved to the work folder, at 224 px: what ``--features torchscript --feature-option path=...``
    runs, e.g. with an SSCD descriptor. Best of ``--repeats`` alternating passes. Target: disk / memory >= 0.8.
``sd15``
    A pipeline of Stable Diffusion 1.5's published component configurations with random weights (UNet 859.5M,
    VAE 83.7M, CLIP text encoder 123.1M parameters: checked, printed), PNDM with SD's schedule, saved as float32
    safetensors (~4.3 GB in ``--work``), then audited end to end on the CPU at 512 px like ``audit`` against the
    first 100 images, measured the same way. ``--sd15-count-only`` builds it and counts, without saving or auditing.

Printed: Markdown tables, the machine, versions and every command line; written atomically to ``--json`` (default
benchmarks/scale.json): each part's record (settings, seeds, commands, raw numbers, table) replaces that part's old
record, others are kept. Each measured command's output is in ``--work``/runs/NAME.log.

    python benchmarks/scale.py [--part audit,finetune,throughput,sd15] [--sizes 1000,4000,16000]
        [--throughput-images 1000] [--work /tmp/memaudit-scale] [--threads 2] [--json benchmarks/scale.json]
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import multiprocessing
import os
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from common import machine_info, markdown_table
from PIL import Image

from memaudit.core.io import atomic_directory, atomic_write_json, atomic_write_text
from memaudit.models import ModelSpec

HERE = Path(__file__).resolve().parent
RES = 512
DATA_VERSION = 1  # bump when the images drawn for a seed change
TINY_SPEC = ModelSpec(resolution=RES, vae_channels=(8, 16, 16, 16), unet_channels=(8, 16))
TINY_UNET_BLOCKS = {"down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
                    "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"]}
PIPELINE_SEED = 0
AUDIT_OPTIONS = ["--generations", "2", "--min-clique", "2", "--steps", "2", "--batch-size", "4", "--device", "cpu"]
PROMPTS = 2  # the captions of images 0 and 1
FINETUNE_BATCH = 4
SD15_TRAIN = 100
RSS_RATIO_TARGET = 1.25
AUDIT_RSS_TARGET_MB = 4000.0
THROUGHPUT_TARGET = 0.8
BATCH = 64
PNG_MB = 0.2  # about one synthetic 512-px PNG at compress_level=1
SD15_GB = 4.4
# SD 1.5's published parameter counts (runwayml/stable-diffusion-v1-5: unet, vae, text_encoder)
SD15_PUBLISHED = {"unet": 859_520_964, "vae": 83_653_863, "text_encoder": 123_060_480}
SD15_TOLERANCE = 0.001
MARKER = "SCALE-RUSAGE "
SAMPLE_S = 0.5  # seconds between two samples of a measured process tree's memory

# Run in the measured process: the memaudit command line, then its own resource usage as one JSON line.
_CHILD = r"""
import json, resource, sys, time, traceback
spawned = {"forks": 0, "helpers": []}  # DataLoader workers are forks; helpers: e.g. the ldconfig of find_library


def _count(event, args):
    if event == "os.fork":
        spawned["forks"] += 1
    elif event == "subprocess.Popen":
        spawned["helpers"].append([str(args[0]), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss])


sys.addaudithook(_count)
import torch
import memaudit.cli
floor = next((int(ln.split()[1]) for ln in open("/proc/self/status") if ln.startswith("VmHWM:")), None)
sys.argv = ["memaudit", *sys.argv[1:]]
t0 = time.perf_counter()
rc = 0
try:
    memaudit.cli.main()
except SystemExit as e:
    rc = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
except Exception:  # a bug, not a user error: its traceback goes to the log, its resource usage still comes back
    traceback.print_exc()
    rc = 1
wall = time.perf_counter() - t0
me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
hwm = next((int(ln.split()[1]) for ln in open("/proc/self/status") if ln.startswith("VmHWM:")), None)
print(MARKER + json.dumps({"rc": rc, "wall_s": wall, "maxrss_kb": me.ru_maxrss, "hwm_kb": hwm, "import_maxrss_kb": floor,
      "children_maxrss_kb": kids.ru_maxrss, "forks": spawned["forks"], "helpers": spawned["helpers"],
      "cpu_s": me.ru_utime + me.ru_stime, "children_cpu_s": kids.ru_utime + kids.ru_stime}), flush=True)
sys.exit(rc)
""".replace("MARKER", repr(MARKER))


# -- synthetic data ------------------------------------------------------------------------------------------------


def texture(seed: int, i: int, res: int = RES, waves: int = 4) -> np.ndarray:
    """Image ``i`` of ``seed``: ``[res, res, 3]`` uint8, per channel a sum of ``waves`` random plane waves of 0.3 to 3
    cycles per image. ``sin(u + v) = sin u cos v + cos u sin v`` makes each channel one ``[res, 2w] @ [2w, res]``
    product."""
    rng = np.random.default_rng([seed, i])
    pos = ((np.arange(res, dtype=np.float64) + 0.5) / res * 2 * np.pi)[None, None, :]
    fx = rng.uniform(0.3, 3.0, (3, waves, 1)) * rng.choice([-1.0, 1.0], (3, waves, 1))
    fy = rng.uniform(0.3, 3.0, (3, waves, 1)) * rng.choice([-1.0, 1.0], (3, waves, 1))
    phase = rng.uniform(0, 2 * np.pi, (3, waves, 1))
    amp = rng.uniform(0.5, 1.0, (3, waves, 1))
    u, v = fx * pos, fy * pos + phase  # [3, waves, res]: along x, along y
    rows = np.concatenate([amp * np.cos(v), amp * np.sin(v)], axis=1).transpose(0, 2, 1)  # [3, res(y), 2w]
    cols = np.concatenate([np.sin(u), np.cos(u)], axis=1)  # [3, 2w, res(x)]
    img = rows @ cols
    lo, hi = img.min(axis=(1, 2), keepdims=True), img.max(axis=(1, 2), keepdims=True)
    base, span = rng.uniform(0.0, 0.4, (3, 1, 1)), rng.uniform(0.4, 0.6, (3, 1, 1))
    img = (base + span * (img - lo) / np.maximum(hi - lo, 1e-9)) * 255
    return np.ascontiguousarray(img.transpose(1, 2, 0).round().astype(np.uint8))


def _image_name(i: int) -> str:
    return f"images/{i:06d}.png"


def caption(i: int) -> str:
    return f"a synthetic texture number {i}"


def _write_images(job: tuple[int, str, list[int]]) -> int:
    """Write the images ``indices`` of ``seed`` into ``folder`` (each through a temporary file and a rename)."""
    seed, folder, indices = job
    for i in indices:
        path = Path(folder) / _image_name(i)
        tmp = path.with_name(f".{path.name}.tmp")
        Image.fromarray(texture(seed, i)).save(tmp, format="PNG", compress_level=1)
        os.replace(tmp, path)
    return len(indices)


def _manifest(data: Path) -> dict[str, Any] | None:
    try:
        return json.loads((data / "scale-data.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def data_mismatch(data: Path, seed: int) -> str | None:
    """Why the images in ``data`` cannot be reused with ``seed`` (``None`` when they can or there are none)."""
    m = _manifest(data)
    if m is None:
        return None
    want = {"seed": seed, "resolution": RES, "version": DATA_VERSION}
    have = {k: m.get(k) for k in want}
    if have != want:
        return (f"{data} holds images made with {have}, not {want}; pass another --work or delete {data}")
    return None


def build_data(data: Path, n: int, seed: int, prefixes: list[int], workers: int) -> dict[str, Any]:
    """Make sure ``data`` holds images 0..n-1 and ``captions.csv`` plus ``captions-K.csv`` for each K of
    ``prefixes``; images already there are kept (a rerun writes only the missing ones)."""
    (data / "images").mkdir(parents=True, exist_ok=True)
    for stale in (data / "images").glob(".*.tmp"):  # left by an interrupted run of this script
        stale.unlink()
    old = _manifest(data) or {}
    n = max(n, int(old.get("n", 0)))
    todo = [i for i in range(n) if not (data / _image_name(i)).is_file()]
    t0 = time.perf_counter()
    if todo:
        print(f"data: writing {len(todo):,} of {n:,} images of {RES} px into {data} ({workers} process(es))",
              flush=True)
        jobs = [(seed, str(data), todo[k : k + 50]) for k in range(0, len(todo), 50)]
        done, step, last = 0, max(1, len(todo) // 20), 0
        with multiprocessing.get_context("spawn").Pool(workers) as pool:
            for k in pool.imap_unordered(_write_images, jobs):
                done += k
                if done - last >= step or done == len(todo):
                    last = done
                    spent = time.perf_counter() - t0
                    print(f"data: {done:,}/{len(todo):,} images ({100 * done / len(todo):.0f}%), {spent / 60:.1f} min, "
                          f"~{spent / done * (len(todo) - done) / 60:.1f} min left", flush=True)
    else:
        print(f"data: reusing {n:,} images in {data}", flush=True)
    for k, name in [(n, "captions.csv"), *((k, captions_file(data, k).name) for k in prefixes)]:
        atomic_write_text(data / name, "file,caption\n" + "".join(f"{_image_name(i)},{caption(i)}\n" for i in range(k)))
    atomic_write_json(data / "scale-data.json", {"seed": seed, "resolution": RES, "version": DATA_VERSION, "n": n,
                                                 "png": "compress_level=1"})
    return {"images": n, "written": len(todo), "seconds": time.perf_counter() - t0}


def captions_file(data: Path, n: int) -> Path:
    return data / f"captions-{n}.csv"


# -- pipelines -----------------------------------------------------------------------------------------------------


def _build_info(folder: Path) -> dict[str, Any] | None:
    try:
        return json.loads((folder / "memaudit_scale_build.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def tiny_pipeline(work: Path) -> Path:
    """The tiny 512-px pipeline in ``work``/tiny512, built and saved when absent or of another layout.

    :func:`memaudit.models.build_pipeline` of :data:`TINY_SPEC`, with the UNet's first level (64x64 latents) made a
    plain ResNet level (``DownBlock2D``/``UpBlock2D``): cross-attention over 4,096 tokens made a training step ten
    times slower (5.3 s against 0.55 s on 2 cores) and its activations would dwarf what the data size changes."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    from memaudit.models import build_pipeline, count_parameters

    folder = work / "tiny512"
    info = {"spec": TINY_SPEC.to_dict(), "seed": PIPELINE_SEED, "unet_blocks": TINY_UNET_BLOCKS}
    old = _build_info(folder)
    if old is not None and {k: old.get(k) for k in info} == json.loads(json.dumps(info)):
        return folder
    pipe = build_pipeline(TINY_SPEC, seed=PIPELINE_SEED)
    torch.manual_seed(PIPELINE_SEED)
    unet = UNet2DConditionModel.from_config({**pipe.unet.config, **TINY_UNET_BLOCKS})
    pipe = StableDiffusionPipeline(**{**pipe.components, "unet": unet})
    info["parameters"] = {k: count_parameters(getattr(pipe, k)) for k in ("unet", "vae", "text_encoder")}
    with atomic_directory(folder) as tmp:
        pipe.save_pretrained(tmp, safe_serialization=True)
        atomic_write_json(tmp / "memaudit_scale_build.json", info)
    print(f"built the tiny 512-px pipeline in {folder}: parameters {info['parameters']}", flush=True)
    return folder


def build_sd15(seed: int = PIPELINE_SEED):
    """A StableDiffusionPipeline with SD 1.5's published component configurations and random weights."""
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from memaudit.models import make_scheduler
    from memaudit.tokenizers import build_clip_tokenizer

    tokenizer = build_clip_tokenizer(model_max_length=77)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=(320, 640, 1280, 1280),
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=768, attention_head_dim=8)
    torch.manual_seed(seed + 1)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
        latent_channels=4, sample_size=512, down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, scaling_factor=0.18215)
    torch.manual_seed(seed + 2)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
        max_position_embeddings=77, hidden_act="quick_gelu", bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id))
    return StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=make_scheduler("pndm"),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)


def resnet50_torchscript(work: Path) -> Path:
    """torchvision's ResNet-50 with random weights (seed 0), classifier removed, scripted into ``work``."""
    import torchvision

    path = work / "resnet50-random.torchscript.pt"
    if path.is_file():
        return path
    torch.manual_seed(0)
    model = torchvision.models.resnet50(weights=None)
    model.fc = torch.nn.Identity()
    tmp = path.with_name(f".{path.name}.tmp")
    torch.jit.save(torch.jit.script(model.eval()), str(tmp))
    os.replace(tmp, path)
    return path


# -- measuring one command -----------------------------------------------------------------------------------------


def _memory_kb(pid: int) -> dict[str, int]:
    """Rss, Pss and private (Private_Clean + Private_Dirty) memory of a process in kB, from /proc; {} if gone."""
    out: dict[str, int] = {}
    try:
        with open(f"/proc/{pid}/smaps_rollup", encoding="ascii") as f:
            for line in f:
                key, _, rest = line.partition(":")
                if key in ("Rss", "Pss", "Private_Clean", "Private_Dirty"):
                    out[key] = int(rest.split()[0])
    except (OSError, ValueError):
        return {}
    out["Private"] = out.pop("Private_Clean", 0) + out.pop("Private_Dirty", 0)
    return out


def _descendants(pid: int) -> list[int]:
    found, todo = [], [pid]
    while todo:
        for children in Path(f"/proc/{todo.pop()}/task").glob("*/children"):
            try:
                kids = [int(k) for k in children.read_text().split()]
            except (OSError, ValueError):
                continue
            found += kids
            todo += kids
    return found


class _Sampler:
    """Peaks of a process tree's memory, sampled: the main process's RSS, the summed private memory of its
    descendants (the DataLoader workers' own pages; forks share the rest with the main process) and the summed PSS
    of the whole tree (what the command costs the machine, shared pages split between their users)."""

    def __init__(self, pid: int):
        self.pid, self.main_rss_kb, self.workers_private_kb, self.tree_pss_kb, self.workers = pid, 0, 0, 0, 0

    def sample(self) -> int:
        main = _memory_kb(self.pid)
        kids = [m for m in map(_memory_kb, _descendants(self.pid)) if m]
        self.main_rss_kb = max(self.main_rss_kb, main.get("Rss", 0))
        self.workers_private_kb = max(self.workers_private_kb, sum(k["Private"] for k in kids))
        self.tree_pss_kb = max(self.tree_pss_kb, main.get("Pss", 0) + sum(k.get("Pss", 0) for k in kids))
        self.workers = max(self.workers, len(kids))
        return main.get("Rss", 0)

    def record(self) -> dict[str, float]:
        return {"sampled_peak_rss_mb": self.main_rss_kb * 1024 / 1e6,
                "sampled_workers_private_mb": self.workers_private_kb * 1024 / 1e6,
                "sampled_tree_pss_mb": self.tree_pss_kb * 1024 / 1e6, "sampled_max_children": self.workers}


def _error_line(lines: list[str], code: int) -> str:
    """The last line of a log that says something (rich's box borders stripped)."""
    for line in reversed(lines):
        text = line.strip().strip("│╭╮╰╯─ ").strip()
        if text and not line.startswith(MARKER) and any(c.isalnum() for c in text):
            return text
    return f"exit code {code}"


def measure(name: str, cli: list[str], work: Path, threads: int, rss_limit_mb: float) -> dict[str, Any]:
    """Run ``memaudit *cli`` in a fresh process and return its peak RSS (MB = 10^6 bytes), wall time and exit code.

    The process is killed if its RSS passes ``rss_limit_mb`` (0: no limit); its output goes to runs/NAME.log.
    """
    log = work / "runs" / f"{name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    command = shlex.join(["memaudit", *cli])
    print(f"[{name}] MEMAUDIT_THREADS={threads} {command}", flush=True)
    env = {**os.environ, "MEMAUDIT_THREADS": str(threads)}
    killed = False
    t0 = time.perf_counter()
    with open(log, "w", encoding="utf-8") as out:
        proc = subprocess.Popen([sys.executable, "-c", _CHILD, *cli], stdout=out, stderr=subprocess.STDOUT, env=env)
        sampler = _Sampler(proc.pid)
        while True:
            try:
                proc.wait(timeout=SAMPLE_S)
                break
            except subprocess.TimeoutExpired:
                rss_mb = sampler.sample() * 1024 / 1e6
                if rss_limit_mb and rss_mb > rss_limit_mb and not killed:
                    proc.kill()
                    killed = True
    process_wall = time.perf_counter() - t0
    lines = log.read_text(encoding="utf-8", errors="replace").splitlines()
    usage = next((json.loads(ln[len(MARKER):]) for ln in reversed(lines) if ln.startswith(MARKER)), None)
    rec: dict[str, Any] = {"name": name, "command": command, "env": {"MEMAUDIT_THREADS": threads}, "log": str(log),
                           "exit_code": proc.returncode, "process_wall_s": process_wall, **sampler.record()}
    if usage is not None:
        # VmHWM, the peak RSS of this process image: getrusage's ru_maxrss survives exec, so a child of a large
        # parent (this script after the throughput part holds its images) would report the parent's peak
        peak_kb = usage.get("hwm_kb") or usage["maxrss_kb"]
        rec.update(wall_s=usage["wall_s"], peak_rss_mb=peak_kb * 1024 / 1e6, raw_rusage=usage,
                   import_rss_mb=usage["import_maxrss_kb"] * 1024 / 1e6, cpu_s=usage["cpu_s"],
                   workers_cpu_s=usage["children_cpu_s"])
        rec["workers_started"] = usage["forks"]
        if usage["forks"]:  # else RUSAGE_CHILDREN holds only helpers such as ldconfig
            rec["workers_peak_rss_mb"] = usage["children_maxrss_kb"] * 1024 / 1e6
    if killed:
        rec["error"] = f"killed: RSS passed --rss-limit-mb {rss_limit_mb:,.0f}"
    elif proc.returncode != 0:
        rec["error"] = _error_line(lines, proc.returncode)
    if "error" in rec:
        print(f"[{name}] FAILED after {process_wall:.1f} s: {rec['error']} (see {log})", flush=True)
    else:
        print(f"[{name}] {rec['wall_s']:.1f} s, peak RSS {rec['peak_rss_mb']:,.0f} MB; sampled: workers' private "
              f"{rec['sampled_workers_private_mb']:,.0f} MB, whole command PSS {rec['sampled_tree_pss_mb']:,.0f} MB",
              flush=True)
    return rec


def _fresh(*paths: Path) -> None:
    for p in paths:
        shutil.rmtree(p, ignore_errors=True)


# -- tables --------------------------------------------------------------------------------------------------------


def _mb(r: dict | None, key: str = "peak_rss_mb") -> str:
    if r is None:
        return "not run"
    if "error" in r or key not in r:
        return "failed" if "error" in r else "—"
    return f"{r[key]:,.0f}"


def _secs(r: dict | None) -> str:
    if r is None:
        return "not run"
    return "failed" if "error" in r or "wall_s" not in r else f"{r['wall_s']:.1f}"


def _ratio(r: dict | None, base: dict | None) -> str:
    ok = r is not None and base is not None and "error" not in r and "error" not in base
    return f"{r['peak_rss_mb'] / base['peak_rss_mb']:.2f}" if ok else "—"


def _verdict(met: bool) -> str:
    return "met" if met else "MISSED"


def rss_targets(what: str, runs: dict[int, dict], sizes: list[int], absolute_mb: float | None = None) -> list[str]:
    """Lines stating the RSS targets of one command over ``sizes`` (or why they cannot be judged)."""
    small, large = runs.get(min(sizes)), runs.get(max(sizes))
    if not small or not large or "error" in small or "error" in large:
        return [f"{what}: targets not judged (a run at {min(sizes):,} or {max(sizes):,} images failed)"]
    ratio = large["peak_rss_mb"] / small["peak_rss_mb"]
    lines = [f"{what} peak RSS at {max(sizes):,} images / at {min(sizes):,}: {ratio:.2f} (target <= "
             f"{RSS_RATIO_TARGET}: {_verdict(ratio <= RSS_RATIO_TARGET)})"]
    if absolute_mb is not None:
        lines.append(f"{what} peak RSS at {max(sizes):,} images: {large['peak_rss_mb']:,.0f} MB (target < "
                     f"{absolute_mb:,.0f} MB: {_verdict(large['peak_rss_mb'] < absolute_mb)})")
    return lines


def _num(r: dict, key: str, fmt: str = ",.0f") -> str:
    return format(r[key], fmt) if r.get(key) is not None else "—"


def _growth(what: str, runs: dict[int, dict], sizes: list[int]) -> list[str]:
    """A line of how a command's peak RSS grows from the smallest size to the largest, with no target."""
    small, large = runs.get(min(sizes)), runs.get(max(sizes))
    if not small or not large or "error" in small or "error" in large:
        return []
    return [f"{what} peak RSS at {max(sizes):,} images / at {min(sizes):,}: "
            f"{large['peak_rss_mb'] / small['peak_rss_mb']:.2f} (no target)"]


def detail_table(records: list[dict]) -> str:
    """Every number of each run (failed runs included)."""
    cols: list[tuple[str, Callable[[dict], str]]] = [
        ("run", lambda r: r["name"]),
        ("peak RSS (MB)", lambda r: _num(r, "peak_rss_mb")),
        ("workers started", lambda r: _num(r, "workers_started", "d")),
        ("workers' peak RSS (MB)", lambda r: _num(r, "workers_peak_rss_mb")),
        ("workers' private, sampled (MB)", lambda r: _num(r, "sampled_workers_private_mb")),
        ("whole command PSS, sampled (MB)", lambda r: _num(r, "sampled_tree_pss_mb")),
        ("RSS after imports (MB)", lambda r: _num(r, "import_rss_mb")),
        ("wall (s)", lambda r: _num(r, "wall_s", ".1f")),
        ("process wall (s)", lambda r: _num(r, "process_wall_s", ".1f")),
        ("CPU s (workers)", lambda r: f"{r['cpu_s']:.0f} ({r['workers_cpu_s']:.0f})" if "cpu_s" in r else "—"),
        ("exit", lambda r: str(r["exit_code"]) + (f": {r['error']}" if "error" in r else "")),
    ]
    return markdown_table(records, cols)


DETAIL_NOTE = ("peak RSS: VmHWM of the command's process (/proc/self/status at its end); workers started: its forks (the "
               "DataLoader workers); workers' peak RSS: RUSAGE_CHILDREN, the largest finished child, a worker or a "
               "helper such as the `ldconfig -p` that imports run, each counting the pages a fork shares with the "
               "main process (— without workers); sampled every "
               f"{SAMPLE_S} s from /proc: the workers' own (private) pages summed, and the PSS of the whole process "
               "tree; wall: the command itself, process wall: with the interpreter's start and imports.")


def summary_table(sizes: list[int], audit: dict[int, dict] | None, finetune: dict[int, dict] | None, steps: int,
                  absent: str | None = "not run") -> str:
    """The side-by-side table: per size, audit and fine-tune peak RSS, wall, and RSS against the smallest size.

    A command not measured (``None``) shows ``absent`` in its columns, or has no columns when ``absent`` is None."""
    cols: list[tuple[str, Callable[[int], str]]] = [("images", lambda n: f"{n:,}")]
    for what, runs in (("audit", audit), ("fine-tune", finetune)):
        if runs is None and absent is None:
            continue
        r = runs or {}
        r0 = r.get(min(sizes))
        label = f"{what} ({steps} steps)" if what == "fine-tune" else what
        cols += [(f"{label} peak RSS (MB)", lambda n, r=r, on=runs is not None: _mb(r.get(n)) if on else absent),
                 (f"{what} wall (s)", lambda n, r=r, on=runs is not None: _secs(r.get(n)) if on else absent),
                 (f"{what} RSS / at {min(sizes):,}", lambda n, r=r, r0=r0: _ratio(r.get(n), r0))]
    return markdown_table(sizes, cols)


# -- parts ---------------------------------------------------------------------------------------------------------


class Context:
    """What every part shares: options, folders, the prompts file and the tiny pipeline."""

    def __init__(self, args: argparse.Namespace, data: Path, prompts: Path):
        self.args, self.work, self.data, self.prompts = args, args.work, data, prompts
        self.results: dict[str, dict[int, dict]] = {}
        self.skipped: dict[str, str] = {}

    @property
    def pipeline(self) -> Path:
        return tiny_pipeline(self.work)


def audit_cli(pipe: Path, train: Path, prompts: Path, base: Path) -> list[str]:
    """``memaudit audit`` of ``pipe`` writing into ``base``/out, with a fresh feature cache ``base``/cache."""
    return ["audit", str(pipe), "--train", str(train), "--prompts", str(prompts), *AUDIT_OPTIONS,
            "--out", str(base / "out"), "--cache-dir", str(base / "cache")]


def part_audit(ctx: Context) -> dict[str, Any]:
    args, runs = ctx.args, {}
    pipe = ctx.pipeline
    for n in args.sizes:
        base = ctx.work / "runs" / f"audit-{n}"
        _fresh(base)
        runs[n] = measure(f"audit-{n}", audit_cli(pipe, captions_file(ctx.data, n), ctx.prompts, base), ctx.work,
                          args.threads, args.rss_limit_mb)
    ctx.results["audit"] = runs
    md = "\n".join([summary_table(args.sizes, runs, None, args.finetune_steps, absent=None), "",
                    *rss_targets("audit", runs, args.sizes, AUDIT_RSS_TARGET_MB), "",
                    detail_table(list(runs.values())), "", DETAIL_NOTE])
    return {"settings": {"pipeline": str(pipe), "spec": TINY_SPEC.to_dict(), "sizes": args.sizes,
                         "prompts": PROMPTS, "options": AUDIT_OPTIONS, "threads": args.threads,
                         "cache": "a fresh --cache-dir per run"},
            "runs": {str(n): r for n, r in runs.items()}, "markdown": md}


def finetune_has_cache_dir() -> bool:
    env = {**os.environ, "COLUMNS": "300", "NO_COLOR": "1", "TERM": "dumb"}
    out = subprocess.run([sys.executable, "-c", "import memaudit.cli; memaudit.cli.main()", "finetune", "--help"],
                         capture_output=True, text=True, env=env)
    return "--cache-dir" in out.stdout + out.stderr


def part_finetune(ctx: Context) -> dict[str, Any]:
    args = ctx.args
    settings = {"sizes": args.sizes, "steps": args.finetune_steps, "batch_size": FINETUNE_BATCH,
                "threads": args.threads, "seed": "memaudit's default (0)",
                "cache": "one --cache-dir shared by the sizes, built in increasing order (each size's 1-step run "
                         "encodes the images the smaller sizes did not)", "reuse_latents": args.reuse_latents}
    if not finetune_has_cache_dir():
        msg = ("skipped: `memaudit finetune --help` lists no --cache-dir (the on-disk latent cache is not there "
               "yet); without it the fine-tune holds every training image in memory")
        print(msg, flush=True)
        ctx.skipped["finetune"] = msg
        return {"settings": settings, "skipped": msg, "markdown": msg}
    pipe = ctx.pipeline
    runs, builds = {}, {}
    # One cache for every size, as a search's proxy split shares its set's: the sizes run in increasing order, so each
    # size's 1-step build encodes only the images the smaller sizes did not (the folders share their first images).
    latents = ctx.work / "runs" / "finetune-latents"
    if not args.reuse_latents:
        _fresh(latents)
    for n in sorted(args.sizes):
        base = ctx.work / "runs" / f"finetune-{n}"
        _fresh(base)
        common_cli = ["finetune", str(pipe), "--train", str(captions_file(ctx.data, n)), "--batch-size",
                      str(FINETUNE_BATCH), "--device", "cpu", "--cache-dir", str(latents)]
        builds[n] = measure(f"finetune-{n}-cache-build", [*common_cli, "--steps", "1", "--out", str(base / "build")],
                            ctx.work, args.threads, args.rss_limit_mb)
        runs[n] = measure(f"finetune-{n}", [*common_cli, "--steps", str(args.finetune_steps), "--out",
                                            str(base / "out")], ctx.work, args.threads, args.rss_limit_mb)
    ctx.results["finetune"] = runs
    md = "\n".join([summary_table(args.sizes, None, runs, args.finetune_steps, absent=None), "",
                    *rss_targets("fine-tune", runs, args.sizes), *_growth("cache build (1 step)", builds, args.sizes),
                    "", detail_table([r for n in args.sizes for r in (builds[n], runs[n])]), "", DETAIL_NOTE])
    return {"settings": settings, "runs": {str(n): r for n, r in runs.items()},
            "cache_builds": {str(n): r for n, r in builds.items()}, "markdown": md}


def _timed(fn: Callable[..., Any], *fn_args: Any) -> float:
    t0 = time.perf_counter()
    fn(*fn_args)
    return time.perf_counter() - t0


def _in_memory(extractor, images: torch.Tensor) -> None:
    for k in range(0, len(images), BATCH):
        extractor(images[k : k + BATCH])


def _from_disk(extractor, ds) -> None:
    for _, images in ds.batches(BATCH):
        extractor((images + 1) / 2)


def part_throughput(ctx: Context) -> dict[str, Any]:
    from memaudit.data import default_workers, load_dataset
    from memaudit.features import get_extractor

    args, n = ctx.args, ctx.args.throughput_images
    ds = load_dataset(captions_file(ctx.data, n), RES, 3)
    script = resnet50_torchscript(ctx.work)
    extractors = [("pixels", "pixels (32 px, 3,072-d)", {}),
                  ("torchscript", "ResNet-50, random weights, TorchScript, 224 px, 2,048-d", {"path": str(script),
                                                                                          "size": 224})]
    print(f"throughput: decoding {n:,} images into memory ({n * 3 * RES * RES * 4 / 1e9:.1f} GB float32)", flush=True)
    memory = torch.empty((n, 3, RES, RES))
    for idx, images in ds.batches(BATCH):
        memory[idx] = images
    memory.add_(1).mul_(0.5)
    rows = []
    for name, label, options in extractors:
        extractor = get_extractor(name, device="cpu", batch_size=BATCH, **options)
        extractor(memory[:BATCH])  # warm-up, untimed

        mem_s, disk_s = [], []
        for _ in range(args.repeats):
            mem_s.append(_timed(_in_memory, extractor, memory))
            disk_s.append(_timed(_from_disk, extractor, ds))
        row = {"extractor": name, "label": label, "options": options, "images": n, "memory_s": mem_s, "disk_s": disk_s,
               "memory_images_per_s": n / min(mem_s), "disk_images_per_s": n / min(disk_s)}
        row["ratio"] = row["disk_images_per_s"] / row["memory_images_per_s"]
        print(f"throughput: {label}: memory {row['memory_images_per_s']:.1f} images/s, disk "
              f"{row['disk_images_per_s']:.1f} images/s, ratio {row['ratio']:.2f}", flush=True)
        rows.append(row)
    del memory
    gc.collect()
    workers = default_workers()
    md = "\n".join([
        f"{n:,} images of {RES} px (PNG), batches of {BATCH}, torch {torch.get_num_threads()} threads, {workers} "
        f"DataLoader worker(s) (the default); best of {args.repeats}",
        "",
        markdown_table(rows, [("extractor", lambda r: r["label"]),
                              ("in memory (images/s)", lambda r: f"{r['memory_images_per_s']:.1f}"),
                              ("from disk (images/s)", lambda r: f"{r['disk_images_per_s']:.1f}"),
                              ("disk / memory", lambda r: f"**{r['ratio']:.2f}**"),
                              (f"target >= {THROUGHPUT_TARGET}", lambda r: _verdict(r["ratio"] >= THROUGHPUT_TARGET))]),
    ])
    return {"settings": {"images": n, "batch": BATCH, "workers": workers, "repeats": args.repeats,
                         "torch_threads": torch.get_num_threads(), "resnet50_seed": 0,
                         "files": "in the page cache (the in-memory pass reads them first)"},
            "rows": rows, "markdown": md}


def part_sd15(ctx: Context) -> dict[str, Any]:
    from memaudit.models import count_parameters

    args, folder = ctx.args, ctx.work / "sd15"
    info = _build_info(folder)
    if info is None or args.sd15_count_only:
        print("sd15: building Stable Diffusion 1.5's components with random weights", flush=True)
        t0 = time.perf_counter()
        pipe = build_sd15()
        info = {"seed": PIPELINE_SEED, "scheduler": "pndm", "build_s": time.perf_counter() - t0,
                "parameters": {k: count_parameters(getattr(pipe, k)) for k in SD15_PUBLISHED}}
        if not args.sd15_count_only:
            print(f"sd15: saving it to {folder} (float32 safetensors)", flush=True)
            with atomic_directory(folder) as tmp:
                pipe.save_pretrained(tmp, safe_serialization=True)
                atomic_write_json(tmp / "memaudit_scale_build.json", info)
        del pipe
        gc.collect()
    else:
        print(f"sd15: reusing {folder}", flush=True)
    counts = info["parameters"]
    rows = [{"part": k, "built": counts[k], "published": v, "diff": counts[k] / v - 1}
            for k, v in SD15_PUBLISHED.items()]
    counts_ok = all(abs(r["diff"]) <= SD15_TOLERANCE for r in rows)
    lines = [markdown_table(rows, [("component", lambda r: r["part"]),
                                   ("parameters built", lambda r: f"{r['built']:,}"),
                                   ("SD 1.5 published", lambda r: f"{r['published']:,}"),
                                   ("difference", lambda r: f"{100 * r['diff']:+.3f}%")]), "",
             f"parameter counts within {100 * SD15_TOLERANCE:.1f}% of SD 1.5's: {_verdict(counts_ok)}"]
    record: dict[str, Any] = {"settings": {"scheduler": "pndm", "seed": PIPELINE_SEED, "train_images": SD15_TRAIN,
                                           "prompts": PROMPTS, "options": AUDIT_OPTIONS, "threads": args.threads,
                                           "count_only": args.sd15_count_only},
                              "parameters": counts, "published": SD15_PUBLISHED, "counts_match": counts_ok}
    if not args.sd15_count_only:
        record["bytes_on_disk"] = sum(p.stat().st_size for p in folder.rglob("*.safetensors"))
        base = ctx.work / "runs" / "sd15-audit"
        _fresh(base)
        run = measure("sd15-audit", audit_cli(folder, captions_file(ctx.data, SD15_TRAIN), ctx.prompts, base),
                      ctx.work, args.threads, args.rss_limit_mb)
        record["audit"] = run
        lines += ["", f"audit at {RES} px on the CPU, {PROMPTS} prompts x 2 generations x 2 steps, {SD15_TRAIN} "
                      f"training images ({record['bytes_on_disk'] / 1e9:.2f} GB of safetensors):", "",
                  detail_table([run]), "", DETAIL_NOTE]
    record["markdown"] = "\n".join(lines)
    return record


PARTS: dict[str, Callable[[Context], dict[str, Any]]] = {
    "audit": part_audit, "finetune": part_finetune, "throughput": part_throughput, "sd15": part_sd15}


# -- command line --------------------------------------------------------------------------------------------------


def _sizes(text: str) -> list[int]:
    try:
        sizes = [int(float(s)) for s in text.split(",") if s.strip()]
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"sizes must be numbers separated by commas, like 1000,4000 ({e})") from e
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError("give at least one positive size")
    return sorted(set(sizes))


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", action="append", default=None,
                    help=f"part(s) to run: {', '.join(PARTS)} or all; repeatable or comma-separated (default all)")
    ap.add_argument("--sizes", type=_sizes, default=[1000, 4000, 16000],
                    help="training set sizes of the audit and fine-tune parts (default 1000,4000,16000)")
    ap.add_argument("--throughput-images", type=int, default=1000, help="images of the throughput part (default 1000)")
    ap.add_argument("--work", type=Path, default=Path("/tmp/memaudit-scale"),
                    help="folder of the synthetic data, pipelines and runs; reused by a rerun (default "
                         "/tmp/memaudit-scale)")
    ap.add_argument("--json", type=Path, default=HERE / "scale.json",
                    help="JSON file to merge the records into (default benchmarks/scale.json)")
    ap.add_argument("--threads", type=int, default=2, help="MEMAUDIT_THREADS of every measured command and torch "
                                                           "threads of the throughput part (default 2)")
    ap.add_argument("--finetune-steps", type=int, default=50, help="steps of the measured fine-tune (default 50)")
    ap.add_argument("--repeats", type=int, default=2, help="passes per side of the throughput part; the best counts")
    ap.add_argument("--reuse-latents", action="store_true",
                    help="finetune part: keep the latent cache of an earlier run (its builds then encode only the images "
                         "it lacks); default: start from an empty cache")
    ap.add_argument("--seed", type=int, default=0, help="seed of the synthetic images (default 0)")
    ap.add_argument("--gen-workers", type=int, default=2, help="processes writing the synthetic images (default 2)")
    ap.add_argument("--rss-limit-mb", type=float, default=16000,
                    help="kill a measured command whose RSS passes this many MB (0: no limit; default 16000)")
    ap.add_argument("--sd15-count-only", action="store_true",
                    help="sd15: build the pipeline and count its parameters, without saving or auditing it")
    return ap


def _parts(ap: argparse.ArgumentParser, values: list[str] | None) -> list[str]:
    names: list[str] = []
    for value in values or ["all"]:
        for name in (v.strip() for v in value.split(",")):
            if name == "all":
                names += list(PARTS)
            elif name in PARTS:
                names.append(name)
            elif name:
                ap.error(f"unknown part {name!r}; choose from {', '.join(PARTS)} or all")
    return list(dict.fromkeys(names))


def _read_records(path: Path) -> dict[str, Any]:
    try:
        old = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:
        print(f"warning: cannot read {path} ({e}); starting a new file", file=sys.stderr)
        return {}
    return old if isinstance(old, dict) else {}


def main(argv: list[str] | None = None) -> int:
    from memaudit.audit import versions
    from memaudit.core.errors import MemauditError
    from memaudit.core.io import check_writable

    argv = sys.argv[1:] if argv is None else list(argv)
    ap = _parser()
    args = ap.parse_args(argv)
    parts = _parts(ap, args.part)
    for label, value, least in (("--throughput-images", args.throughput_images, 1), ("--threads", args.threads, 1),
                                ("--finetune-steps", args.finetune_steps, 1), ("--repeats", args.repeats, 1),
                                ("--gen-workers", args.gen_workers, 1), ("--rss-limit-mb", args.rss_limit_mb, 0)):
        if value < least:
            ap.error(f"{label} must be at least {least}")
    args.work = args.work.expanduser().resolve()
    data = args.work / "data"
    try:
        check_writable(args.json, "--json", folder=False)
    except MemauditError as e:
        ap.error(str(e))
    try:
        args.work.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        ap.error(f"--work {args.work} cannot be created ({e.strerror or e}); pass a folder you can write to")
    why = data_mismatch(data, args.seed)
    if why:
        ap.error(why)
    prefixes = sorted({*(args.sizes if {"audit", "finetune"} & set(parts) else []),
                       *([args.throughput_images] if "throughput" in parts else []),
                       *([SD15_TRAIN] if "sd15" in parts and not args.sd15_count_only else [])})
    n_images = max(prefixes, default=0)
    have = sum((data / _image_name(i)).is_file() for i in range(n_images))
    need_gb = (n_images - have) * PNG_MB / 1e3 + (SD15_GB if "sd15" in parts and not args.sd15_count_only
                                                    and _build_info(args.work / "sd15") is None else 0)
    free_gb = shutil.disk_usage(args.work).free / 1e9
    if need_gb * 1.2 > free_gb:
        ap.error(f"--work {args.work} has {free_gb:.1f} GB free; this run writes about {need_gb:.1f} GB there")

    command = "python benchmarks/scale.py" + (" " + shlex.join(argv) if argv else "")
    run_date = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    torch.set_num_threads(args.threads)
    machine, vers = machine_info("cpu"), versions()
    print(f"machine: {machine['line']}")
    print("versions: " + ", ".join(f"{k} {v}" for k, v in vers.items()))
    print(f"command: {command}\n", flush=True)
    data_info = build_data(data, n_images, args.seed, prefixes, args.gen_workers) if n_images else {}
    prompts = args.work / "prompts.txt"
    atomic_write_text(prompts, "".join(f"{caption(i)}\n" for i in range(PROMPTS)))
    ctx = Context(args, data, prompts)
    records = _read_records(args.json)
    seeds = {"images": args.seed, "pipelines": PIPELINE_SEED, "audit_and_finetune": "memaudit's default (0)"}
    for name in parts:
        started = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
        print(f"\n## {name}\n", flush=True)
        record = PARTS[name](ctx)
        record.update(part=name, machine=machine, versions=vers, command=command, date=started, seeds=seeds,
                      data={"folder": str(data), **data_info})
        print("\n" + record["markdown"] + "\n", flush=True)
        records[name] = record
        atomic_write_json(args.json, records)  # after each part, so a later failure keeps the earlier ones
    if {"audit", "finetune"} & set(parts):
        md = summary_table(args.sizes, ctx.results.get("audit"), ctx.results.get("finetune"), args.finetune_steps)
        targets = [f"{name}: {why}" for name, why in ctx.skipped.items()]
        if "audit" in ctx.results:
            targets += rss_targets("audit", ctx.results["audit"], args.sizes, AUDIT_RSS_TARGET_MB)
        if "finetune" in ctx.results:
            targets += rss_targets("fine-tune", ctx.results["finetune"], args.sizes)
        md = "\n".join([f"machine: {machine['line']}; every command in a fresh process with MEMAUDIT_THREADS="
                        f"{args.threads}; peak RSS of the command's own process (its DataLoader workers: see each "
                        "part's table)", "", md, "", *targets])
        print("## audit and fine-tune at scale\n\n" + md + "\n")
        records["summary"] = {"command": command, "date": run_date, "machine": machine,
                              "versions": vers, "markdown": md}
        atomic_write_json(args.json, records)
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

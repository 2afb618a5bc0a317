"""What manifest bookkeeping costs at 10k, 100k and 1M rows (issue 19).

N realistic rows are generated deterministically (seeded; MTD-, KolektorSDD-, KolektorSDD2- and
Severstal-like paths, a sha256, image geometry, good or defect labels with masks, store
artifacts on some defects, 4-6 measures per row, a few dropped rows with reasons), then each
step is timed on its own:

1. build   ``Manifest.build(rows, ...)``: canonicalise, validate, sort, hash;
2. derive  one column with today's row API: ``rows = m.row_list()``, ``split`` set on every
           row, ``m.derive(rows, stage="split", stage_version="1")`` (the ``row_list()`` part
           is also reported alone, as 2a);
2b.        the same with ``m.derive_columns({"split": values}, ...)``, when the Manifest class
           has that method (values as a Python list, then as a pyarrow array); its result is
           checked against step 2's (equal ``header["counts"]``, equal tables);
3. save    ``m.write(path)`` into a scratch folder (a temporary one unless ``--scratch``);
4. read    ``Manifest.read(path)``;
5. check   ``m.check()`` on the manifest read back (re-validate, re-hash).

Each size runs in a fresh subprocess; the rows are generated again (untimed) before each
repeat's build and released after it, so a step's memory is what that step holds. Peak RSS:
VmHWM, reset before each step through /proc/self/clear_refs (as benchmarks/_memory.py does),
read after it; the process peak is the largest of those. Medians over ``--repeats``.

    .venv/bin/python benchmarks/manifest.py --sizes 10000,100000,1000000 --repeats 3
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import json
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _memory import reset_peak, vm_status  # benchmarks/ is on sys.path when run

SOURCES = (  # name, share of rows, category
    ("mtd", 0.40, "Magnetic-tile-defect"),
    ("kolektorsdd", 0.25, "KolektorSDD"),
    ("kolektorsdd2", 0.20, "KolektorSDD2"),
    ("severstal", 0.15, "Severstal-steel"),
)
MTD_DEFECTS = ("Blowhole", "Break", "Crack", "Fray", "Uneven")
DROPS = (  # stage, code, detail
    ("quality", "too_dark", "mean brightness 11.3 < 20"),
    ("quality", "blurry", "sharpness 4.1 < 10"),
    ("dedup", "duplicate", "Hamming distance 2 to 3f1c9a0b7d2e4c51, kept that one"),
    ("ingest", "unreadable_image", "truncated JPEG; expected a complete JPEG, PNG, BMP or TIFF"),
)


def hex64(rng: random.Random) -> str:
    return f"{rng.getrandbits(256):064x}"


def pick_source(u: float) -> tuple[str, str]:
    acc = 0.0
    for name, share, category in SOURCES:
        acc += share
        if u < acc:
            return name, category
    return SOURCES[-1][0], SOURCES[-1][2]


def make_rows(n: int, seed: int = 0) -> list[dict[str, Any]]:
    """``n`` rows like the ones ingest, labels, quality and dedup leave behind."""
    from curate.core.manifest import drop, new_row, note

    rng = random.Random(seed)
    rows = []
    for i in range(n):
        name, category = pick_source(rng.random())
        defective = rng.random() < 0.3
        if name == "mtd":
            cls = rng.choice(MTD_DEFECTS) if defective else "Free"
            stem = f"MT_{cls}/Imgs/exp{rng.randint(1, 6)}_num_{i:06d}"
            path, mask = stem + ".jpg", stem + ".png"
            label, classes = (cls, [cls]) if defective else ("good", [])
            width, height, channels = rng.randint(200, 600), rng.randint(200, 600), 3
        elif name.startswith("kolektorsdd"):
            stem = f"kos{i // 8:06d}/Part{i % 8}"
            path, mask = stem + ".jpg", stem + "_label.bmp"
            label, classes = ("defect", ["defect"]) if defective else ("good", [])
            width, height, channels = (500, 1240, 1) if name == "kolektorsdd" else (230, 630, 3)
        else:
            path, mask = f"train_images/{i:08x}.jpg", f"masks/{i:08x}.png"
            cls = f"class_{rng.randint(1, 4)}"
            label, classes = (cls, [cls]) if defective else ("good", [])
            width, height, channels = 1600, 256, 3
        measures: dict[str, Any] = {
            "quality.sharpness": round(rng.uniform(5, 400), 4),
            "quality.brightness": round(rng.uniform(20, 230), 3),
            "quality.contrast": round(rng.uniform(0.05, 0.9), 5),
            "dedup.phash": f"{rng.getrandbits(64):016x}",
        }
        for key in ("quality.noise", "labels.mask_fraction")[:rng.randint(0, 2)]:
            measures[key] = rng.random()
        row = new_row(
            source=name, path=path, category=category, sha256=hex64(rng), format="jpeg",
            width=width, height=height, channels=channels,
            source_split=rng.choice(("train", "test")) if name != "mtd" else None,
            label=label, defect_classes=classes,
            group=f"g{i // 4:07d}" if rng.random() < 0.1 else None,
            annotation={"mask": mask} if defective else {},
            artifacts={"mask": hex64(rng) + ".png"} if defective and rng.random() < 0.7 else {},
            measures=measures,
        )
        if rng.random() < 0.03:
            drop(row, *rng.choice(DROPS))
        if rng.random() < 0.02:
            row["flags"] = [note("quality", "low_contrast", "contrast 0.06 < 0.08")]
        rows.append(row)
    return rows


def split_values(m) -> list[str | None]:
    """The ``split`` column to derive, in the manifest's (canonical) row order."""
    labels = m.table.column("label").to_pylist()
    status = m.table.column("status").to_pylist()
    out: list[str | None] = []
    for i, (label, st) in enumerate(zip(labels, status, strict=True)):
        if st != "kept":
            out.append(None)
        else:
            out.append("test" if label != "good" or i % 5 == 0 else "train")
    return out


class Peak:
    """VmHWM over a block (reset first, as _memory.Peak does), and the process's largest."""

    process = 0  # largest VmHWM seen over the whole process

    def __enter__(self):
        Peak.process = max(Peak.process, vm_status("VmHWM"))
        reset_peak()
        return self

    def __exit__(self, *exc):
        self.value = vm_status("VmHWM")
        Peak.process = max(Peak.process, self.value)


def run_one(n: int, repeats: int, scratch: str | None) -> dict[str, Any]:
    import pyarrow as pa

    from curate.core.manifest import Manifest

    has_columns = hasattr(Manifest, "derive_columns")
    times: dict[str, list[float]] = {}
    peaks: dict[str, int] = {}
    info: dict[str, Any] = {"n": n, "repeats": repeats, "derive_columns": has_columns}

    def record(step: str, seconds: float, peak: Peak | None = None) -> None:
        times.setdefault(step, []).append(seconds)
        if peak is not None:
            peaks[step] = max(peaks.get(step, 0), peak.value)

    with tempfile.TemporaryDirectory(dir=scratch, prefix="curate-manifest-bench-") as tmp:
        for rep in range(repeats):
            t = time.perf_counter()
            rows = make_rows(n, seed=0)
            info["generate_s"] = time.perf_counter() - t
            gc.collect()

            with Peak() as p:
                t = time.perf_counter()
                m = Manifest.build(rows, stage="ingest", stage_version="1",
                                   params={"kind": "bench"}, seed=0)
                took = time.perf_counter() - t
            record("1. build", took, p)
            del rows
            gc.collect()
            values = split_values(m)

            with Peak() as p:
                t0 = time.perf_counter()
                drows = m.row_list()
                t1 = time.perf_counter()
                for row, split in zip(drows, values, strict=True):
                    row["split"] = split
                d_rows = m.derive(drows, stage="split", stage_version="1")
                t2 = time.perf_counter()
            record("2. derive, row API (total)", t2 - t0, p)
            record("2a. row_list() alone", t1 - t0)
            del drows
            gc.collect()

            if has_columns:
                for kind, column in (("list", values), ("pyarrow array",
                                                        pa.array(values, pa.string()))):
                    with Peak() as p:
                        t = time.perf_counter()
                        d_cols = m.derive_columns({"split": column}, stage="split",
                                                  stage_version="1")
                        took = time.perf_counter() - t
                    record(f"2b. derive_columns ({kind})", took, p)
                    same_counts = d_cols.header["counts"] == d_rows.header["counts"]
                    same_table = d_cols.table.equals(d_rows.table)
                    if not (same_counts and same_table):
                        raise SystemExit(f"derive_columns ({kind}) differs from derive at n={n}: "
                                         f"counts equal {same_counts}, tables equal {same_table}")
                    info["same_id"] = info.get("same_id", True) and d_cols.id == d_rows.id
                    del d_cols
                    gc.collect()
            info["derived_id"] = d_rows.id
            del d_rows

            path = Path(tmp) / f"manifest-{n}-{rep}.parquet"
            with Peak() as p:
                t = time.perf_counter()
                m.write(path)
                took = time.perf_counter() - t
            record("3. save (write)", took, p)
            info["file_bytes"] = path.stat().st_size
            info["id"] = m.id
            del m
            gc.collect()

            with Peak() as p:
                t = time.perf_counter()
                back = Manifest.read(path)
                took = time.perf_counter() - t
            record("4. read", took, p)

            with Peak() as p:
                t = time.perf_counter()
                problems = back.check()
                took = time.perf_counter() - t
            record("5. check", took, p)
            if problems or back.id != info["id"]:
                raise SystemExit(f"check of the manifest read back at n={n}: {problems}")
            del back
            path.unlink()
            gc.collect()
            print(f"n={n:,} repeat {rep + 1}/{repeats}: "
                  + ", ".join(f"{k.split(' (')[0]} {v[-1]:.2f} s" for k, v in times.items()),
                  file=sys.stderr, flush=True)

    info["times"] = times
    info["peaks"] = peaks
    info["process_peak"] = max(Peak.process, vm_status("VmHWM"))
    return info


def report(r: dict[str, Any]) -> None:
    n = r["n"]
    print(f"\n### {n:,} rows (median of {r['repeats']}; manifest {r['id']}, "
          f"{r['file_bytes'] / 2**20:.1f} MiB on disk, {r['file_bytes'] / n:.0f} B/row)\n")
    print("| step | median | µs per row | peak RSS during step |\n|---|---|---|---|")
    for step, values in r["times"].items():
        med = statistics.median(values)
        peak = r["peaks"].get(step)
        mem = f"{peak / 2**20:,.0f} MiB" if peak else "(inside 2)"
        print(f"| {step} | {med:.3f} s | {med / n * 1e6:.1f} | {mem} |")
    print(f"\nPeak RSS of the process: {r['process_peak'] / 2**20:,.0f} MiB "
          f"(rows generated in {r['generate_s']:.1f} s, untimed).")
    if not r["derive_columns"]:
        print("Step 2b skipped: Manifest has no derive_columns method in this checkout.")
    else:
        print("derive_columns: counts and tables equal to derive's"
              f"; ids {'equal' if r.get('same_id') else 'DIFFER'}.")
    sys.stdout.flush()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="10000,100000,1000000",
                    help="comma-separated row counts (default %(default)s)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--scratch", default=None,
                    help="folder for the saved manifests (default: a temporary folder)")
    ap.add_argument("--one", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(run_one(args.one, args.repeats, args.scratch)))
        return
    root = Path(__file__).resolve().parent.parent
    commit = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"],
                            capture_output=True, text=True).stdout.strip()
    print(f"curate at {commit or '?'} (working tree), Python {sys.version.split()[0]}, "
          f"sha256 of this script {hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:12]}")
    for n in (int(s) for s in args.sizes.split(",") if s.strip()):
        cmd = [sys.executable, __file__, "--one", str(n), "--repeats", str(args.repeats)]
        if args.scratch:
            cmd += ["--scratch", args.scratch]
        proc = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True)
        report(json.loads(proc.stdout.strip().splitlines()[-1]))


if __name__ == "__main__":
    main()

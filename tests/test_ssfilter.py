"""ssfilter (SSFilter): planted outliers leave a normal set; votes are seeded; folders untouched."""

from __future__ import annotations

import csv
import json
import math

import cv2
import numpy as np
import pytest
from click.testing import CliRunner
from helpers import by_path, ingest, tree_digest

from curate.app.cli import cli
from curate.engine.runner import Context, run_stage
from curate.engine.workspace import Workspace
from curate.imaging.io import decode, encode_png
from curate.stages.split import Split, SplitParams
from curate.stages.ssfilter import scoring
from curate.stages.ssfilter.features import build_descriptor
from curate.stages.ssfilter.folder import filter_folder
from curate.stages.ssfilter.params import SSFilterParams
from curate.stages.ssfilter.scoring import mutual_scores, select_normal
from curate.stages.ssfilter.stage import SSFilter, run_filter

FAST = dict(image_size=128, batch_size=12)  # 8x8 patches an image: milliseconds a batch


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These tensors are tiny: thread hand-offs, not arithmetic, would dominate (badly so on a
    shared machine), so torch runs on one thread here."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def texture(rng: np.random.Generator, size: int = 128) -> np.ndarray:
    """A grey surface with grain, like a machined part: a level, a gentle ramp, blurred noise."""
    ramp = np.linspace(0, 10, size, dtype=np.float32)[None, :] * rng.uniform(-1, 1)
    noise = cv2.GaussianBlur(rng.normal(0, 20, (size, size)).astype(np.float32), (0, 0), 1.5)
    return np.clip(rng.uniform(100, 140) + noise + ramp, 0, 255).astype(np.uint8)


def planted(rng: np.random.Generator, size: int = 128) -> np.ndarray:
    """A texture with a defect: a dark blob and a bright scratch."""
    image = texture(rng, size)
    centre = tuple(int(v) for v in rng.integers(size // 4, 3 * size // 4, 2))
    cv2.circle(image, centre, int(rng.integers(9, 14)), 25, -1)
    p0 = tuple(int(v) for v in rng.integers(0, size, 2))
    p1 = tuple(int(v) for v in rng.integers(0, size, 2))
    cv2.line(image, p0, p1, 245, 2)
    return image


def dataset(seed: int = 0, normal: int = 36, outliers: int = 4):
    rng = np.random.default_rng(seed)
    images = [texture(rng) for _ in range(normal)] + [planted(rng) for _ in range(outliers)]
    truth = np.r_[np.zeros(normal, bool), np.ones(outliers, bool)]
    order = rng.permutation(len(images))
    return [images[i] for i in order], truth[order]


@pytest.fixture(scope="module")
def data():
    return dataset()


@pytest.fixture(scope="module")
def lite(data):
    images, _ = data
    return run_filter(lambda i: images[i], len(images), SSFilterParams(**FAST), seed=0)


# ------------------------------------------------------------------------------ the rules
def test_mutual_score_masks_the_image_itself():
    """An image with a twin scores ~0 (its patches find themselves in the twin); the score of
    a unique image does not come from its own patches."""
    rng = np.random.default_rng(1)
    z = torch_tensor(rng.normal(size=(3, 16, 8)))
    z[1] = z[0]
    scores, patches = mutual_scores(z, sim_ratio=0.001)  # k = 1: the best match
    assert patches.shape == (3, 16)
    assert scores[0] < 1e-5 and scores[1] < 1e-5 and scores[2] > 0.1


def torch_tensor(array):
    import torch

    return torch.from_numpy(np.asarray(array, np.float32))


def test_chunked_similarities_equal_one_matrix():
    rng = np.random.default_rng(2)
    z = torch_tensor(rng.normal(size=(6, 10, 5)))
    whole, _ = mutual_scores(z, 0.02, 0.1, chunk_rows=10 ** 6)
    for rows in (1, 10, 25):
        chunked, _ = mutual_scores(z, 0.02, 0.1, chunk_rows=rows)
        assert np.allclose(whole.numpy(), chunked.numpy(), atol=1e-6)


def test_selection_rules():
    a = np.array([0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 5.0])
    assert select_normal(a).tolist() == [True] * 4 + [False] * 4  # lower half (Eq. 5)
    recalled = select_normal(a, recall_tau=3.0)  # lite: 0.25 + 3 x 0.112 (lower half)
    assert recalled.tolist() == [True] * 5 + [False] * 3
    # Eq. 7: the upper half comes back where its uncertainty is at most the lower half's mean.
    u = np.array([1.0, 2.0, 3.0, 2.0, 1.5, 9.0, 2.0, 8.0])
    assert select_normal(a, u).tolist() == [True] * 5 + [False, True, False]


# ------------------------------------------------------------------------------ lite
def test_lite_removes_planted_outliers(data, lite):
    _, truth = data
    assert not lite.kept[truth].any(), lite.votes[truth]
    assert lite.kept[~truth].mean() >= 0.8
    assert lite.votes[truth].max() <= 5 < lite.votes[~truth].max()
    # The scores rank outliers above normal images (image AUROC).
    above = lite.scores[truth][:, None] > lite.scores[~truth][None, :]
    assert above.mean() >= 0.95
    hard = lite.hard_normals(3)
    assert len(hard) == 3 and not truth[hard].any()
    assert lite.scores[hard[0]] == lite.scores[lite.kept].max()


def test_votes_are_deterministic_by_seed(data):
    images, _ = data
    params = SSFilterParams(kappa1=5, kappa2=1, **FAST)
    one, again, other = (run_filter(lambda i: images[i], len(images), params, seed=seed)
                         for seed in (0, 0, 1))
    assert np.array_equal(again.votes, one.votes) and np.array_equal(again.scores, one.scores)
    assert not np.array_equal(other.scores, one.scores)  # other batches, other scores


def test_scores_batch_by_batch_never_the_whole_set(data, monkeypatch):
    """Memory is bounded by the batch: mutual scoring only ever sees batch_size images, once per
    batch of each shuffling; features go to a memory-mapped file above the memory limit."""
    images, _ = data
    calls = []
    real = scoring.mutual_scores

    def spy(z, *args, **kwargs):
        calls.append(z.shape[0])
        return real(z, *args, **kwargs)

    monkeypatch.setattr(scoring, "mutual_scores", spy)
    params = SSFilterParams(kappa1=2, kappa2=1, **FAST)
    on_disk = run_filter(lambda i: images[i], len(images), params, seed=0, memory_limit=0,
                         chunk_rows=16)
    assert len(calls) == 2 * math.ceil(len(images) / 12) and max(calls) <= 12 and min(calls) >= 2
    in_memory = run_filter(lambda i: images[i], len(images), params, seed=0)
    assert np.allclose(on_disk.scores, in_memory.scores, atol=1e-6)


def test_bundled_backbones_from_a_weights_path():
    """A bundled backbone stands in for the weight-free descriptor (random weights here)."""
    rng = np.random.default_rng(3)
    images = [texture(rng, 64) for _ in range(4)]
    vit = build_descriptor("dinov2_tiny_reg", "random", image_size=56)
    assert tuple(vit.describe(images).shape) == (4, 16, 48 * 3)  # blocks 0, 3 and their mean
    wrn = build_descriptor("wide_resnet_tiny", "random", image_size=64)
    assert tuple(wrn.describe(images).shape) == (4, 64, 512 + 1024)
    result = run_filter(lambda i: images[i], 4, SSFilterParams(
        backbone="dinov2_tiny_reg", weights="random", image_size=56, batch_size=2, kappa1=3,
        kappa2=0), seed=0)
    assert np.isfinite(result.scores).all() and result.votes.max() <= 3


def test_full_mode_runs_on_the_tiny_backbone():
    """Full mode's pipeline: synergy-selected training, then voting with uncertainty. With a
    random tiny ViT this checks the machinery, not the filtering."""
    rng = np.random.default_rng(4)
    images = [texture(rng, 64) for _ in range(6)]
    params = SSFilterParams(mode="full", backbone="dinov2_tiny_reg", weights="random",
                            image_size=56, batch_size=3, iterations=3, cold_start=1, passes=3,
                            kappa1=2, kappa2=0)
    one = run_filter(lambda i: images[i], 6, params, seed=0, device="cpu")
    two = run_filter(lambda i: images[i], 6, params, seed=0, device="cpu")
    assert np.isfinite(one.scores).all() and (one.uncertainty >= 0).all()
    assert np.array_equal(one.votes, two.votes) and np.allclose(one.scores, two.scores)
    with pytest.raises(ValueError, match="DINOv2"):
        SSFilterParams(mode="full", backbone="wide_resnet50_2")


def test_full_mode_on_the_weight_free_descriptor_removes_planted_outliers(data):
    """Full mode without pretrained weights: the patch decoder trains on the randconv features
    with synergy selection, then votes. Planted outliers go; the same seed gives the same
    votes and scores; the uncertainty is recorded and ranks the outliers high."""
    images, truth = data
    params = SSFilterParams(mode="full", iterations=40, cold_start=20, passes=4, **FAST)
    one = run_filter(lambda i: images[i], len(images), params, seed=0, device="cpu")
    two = run_filter(lambda i: images[i], len(images), params, seed=0, device="cpu")
    assert np.array_equal(one.votes, two.votes) and np.array_equal(one.scores, two.scores)
    assert not one.kept[truth].any(), one.votes[truth]
    assert one.kept[~truth].mean() >= 0.8
    assert (one.uncertainty >= 0).all()
    above = one.scores[truth][:, None] > one.scores[~truth][None, :]
    assert above.mean() >= 0.95
    assert one.info["descriptor"]["name"] == "randconv" and "decoder" in one.info
    other = run_filter(lambda i: images[i], len(images), params, seed=1, device="cpu")
    assert not np.array_equal(one.scores, other.scores)
    # Features spilled to a memory-mapped file (as for a large set) train the same model.
    mapped = run_filter(lambda i: images[i], len(images), params, seed=0, device="cpu",
                        memory_limit=1)
    assert np.array_equal(one.votes, mapped.votes) and np.allclose(one.scores, mapped.scores)


def test_patch_decoder_learns_to_reconstruct_and_its_stats_ignore_chunking():
    import torch

    from curate.stages.ssfilter.decoder import PatchDecoder, channel_stats, patch_errors

    rng = np.random.default_rng(0)
    data = rng.normal(3.0, 2.0, size=(50, 4, 6)).astype(np.float16)
    rows = np.arange(0, 50, 2)
    mean, std = channel_stats(data, rows, chunk=7)
    whole = data[rows].astype(np.float64).reshape(-1, 6)
    assert np.allclose(mean.numpy(), whole.mean(0), atol=1e-5)
    assert np.allclose(std.numpy(), whole.std(0), atol=1e-4)
    assert np.allclose(channel_stats(data, rows, chunk=1000)[0].numpy(), mean.numpy())
    torch.manual_seed(0)
    model = PatchDecoder(4, 6, width=16, depth=1, dropout=0.0)
    z = (torch.from_numpy(data.astype(np.float32)) - mean) / std
    before = patch_errors(model, z).mean().item()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(150):
        loss = patch_errors(model, z).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert patch_errors(model, z).shape == (50, 4)
    assert patch_errors(model, z).mean().item() < 0.5 * before


# ------------------------------------------------------------------------------ folder mode
def write_folder(root, images, truth):
    names = []
    for k, (image, bad) in enumerate(zip(images, truth, strict=True)):
        rel = f"{'sub/' if k % 3 == 0 else ''}{'x' if bad else 'n'}{k:03d}.png"
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(encode_png(image))
        names.append(rel)
    (root / "broken.png").write_bytes(encode_png(images[0])[:-30])
    (root / "notes.txt").write_text("not an image")
    return names


def test_folder_mode_leaves_the_input_untouched(tmp_path, data):
    images, truth = data
    src = tmp_path / "train"
    names = write_folder(src, images, truth)
    before = tree_digest(src)
    out = tmp_path / "clean"
    result = CliRunner().invoke(cli, [
        "filter-noise", str(src), "--out", str(out), "--image-size", "128", "--batch-size", "12",
        "--hard-normals", "2", "--json"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert tree_digest(src) == before
    with open(out / "ssfilter-report.csv") as fh:
        report = {r["path"]: r for r in csv.DictReader(fh)}
    assert set(report) == {*names, "broken.png"}
    assert report["broken.png"]["kept"] == "False"
    assert report["broken.png"]["reason"].startswith("unreadable_image")
    kept = {name: report[name]["kept"] == "True" for name in names}
    assert not any(kept[n] for n, bad in zip(names, truth, strict=True) if bad)
    assert np.mean([kept[n] for n, bad in zip(names, truth, strict=True) if not bad]) >= 0.8
    for name in names:
        assert (out / name).exists() == kept[name]
        if kept[name]:
            assert (out / name).is_symlink() and (out / name).resolve() == (src / name).resolve()
    assert sum(r["hard_normal"] == "True" for r in report.values()) == 2
    assert sorted(int(r["rank"]) for r in report.values()) == list(range(1, len(report) + 1))
    sheet = decode((out / "removed.png").read_bytes())
    assert sheet.shape[0] > 100 and (out / "hard-normals.png").is_file()
    # Running again into the same output replaces it; the input still does not change.
    again = CliRunner().invoke(cli, ["filter-noise", str(src), "--out", str(out),
                                     "--image-size", "128", "--batch-size", "12"])
    assert again.exit_code == 0, again.output
    assert tree_digest(src) == before


def test_folder_mode_bad_input(tmp_path):
    (tmp_path / "empty").mkdir()
    result = CliRunner().invoke(cli, ["filter-noise", str(tmp_path / "empty"), "--out",
                                      str(tmp_path / "o")])
    assert result.exit_code == 1 and "no images found" in result.output
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "file").write_text("x")
    (tmp_path / "empty" / "a.png").write_bytes(encode_png(np.zeros((8, 8), np.uint8)))
    with pytest.raises(Exception, match="not an earlier filter-noise output"):
        filter_folder(tmp_path / "empty", tmp_path / "busy", SSFilterParams())
    with pytest.raises(Exception, match="inside the input"):
        filter_folder(tmp_path / "empty", tmp_path / "empty" / "out", SSFilterParams())


# ------------------------------------------------------------------------------ manifests
def write_mtd_layout(root, images, truth, anomalies: int = 2):
    """MTD layout: the images (outliers included) in MT_Free as 'good', and two labelled
    anomalies in MT_Blowhole, which are not training candidates."""
    empty = encode_png(np.zeros((128, 128), np.uint8))
    paths = []
    for k, image in enumerate(images):
        stem = root / "MT_Free" / "Imgs" / f"exp{k % 2}_num_{k}"
        stem.parent.mkdir(parents=True, exist_ok=True)
        stem.with_suffix(".png").write_bytes(empty)
        cv2.imwrite(str(stem.with_suffix(".jpg")), image, [cv2.IMWRITE_JPEG_QUALITY, 95])
        paths.append(f"MT_Free/Imgs/exp{k % 2}_num_{k}.jpg")
    rng = np.random.default_rng(9)
    for k in range(anomalies):
        stem = root / "MT_Blowhole" / "Imgs" / f"exp0_num_{1000 + k}"
        stem.parent.mkdir(parents=True, exist_ok=True)
        stem.with_suffix(".png").write_bytes(empty)
        cv2.imwrite(str(stem.with_suffix(".jpg")), planted(rng))
    return paths


@pytest.fixture(scope="module")
def mtd_like(tmp_path_factory, data):
    images, truth = data
    root = tmp_path_factory.mktemp("ssf") / "mtd"
    return root, write_mtd_layout(root, images, truth), truth


def run_ssfilter(ws_path, root, **params):
    with Context(Workspace.open(ws_path), jobs=1, progress=False, seed=0) as ctx:
        m = ingest(ctx, "mtd", root)
        return run_stage(SSFilter(), [m], SSFilterParams(**FAST, **params), ctx).manifest


def test_manifest_mode_drops_outliers_with_reasons(tmp_path, mtd_like):
    root, paths, truth = mtd_like
    m = run_ssfilter(tmp_path / "a", root)
    rows = by_path(m)
    dropped = {path: rows[path]["status"] == "dropped" for path in paths}
    assert all(dropped[p] for p, bad in zip(paths, truth, strict=True) if bad)
    assert np.mean([not dropped[p] for p, bad in zip(paths, truth, strict=True) if not bad]) >= 0.8
    for path in paths:
        row = rows[path]
        assert {"ssfilter.score", "ssfilter.votes"} <= set(row["measures"])
        if dropped[path]:
            (reason,) = row["reasons"]
            assert reason["code"] == "noise_filter" and reason["stage"] == "ssfilter"
            assert path in reason["detail"] and "shufflings" in reason["detail"]
    anomalies = [r for r in m.rows() if r["label"] != "good"]
    assert anomalies and all(r["status"] == "kept" and not r["measures"] for r in anomalies)
    assert m.header["parents"] and m.header["stage"]["name"] == "ssfilter"
    # Same inputs and seed, another workspace: the same manifest id.
    assert run_ssfilter(tmp_path / "b", root).id == m.id


def test_hard_normals_go_to_test(tmp_path, mtd_like):
    root, paths, truth = mtd_like
    with Context(Workspace.open(tmp_path / "ws"), jobs=1, progress=False, seed=0) as ctx:
        m = ingest(ctx, "mtd", root)
        m = run_stage(SSFilter(), [m], SSFilterParams(**FAST, hard_normals=3), ctx).manifest
        flagged = {r["path"] for r in m.rows()
                   if any(f["code"] == "hard_normal" for f in r["flags"])}
        assert len(flagged) == 3
        assert all(r["status"] == "kept" and r["label"] == "good" for r in m.rows()
                   if r["path"] in flagged)
        top = sorted((r for r in m.rows() if r["status"] == "kept" and "ssfilter.score" in
                      r["measures"]), key=lambda r: -r["measures"]["ssfilter.score"])[:3]
        assert {r["path"] for r in top} == flagged
        split = run_stage(Split(), [m], SplitParams(test_fraction=0.0), ctx).manifest
    rows = by_path(split)
    assert all(rows[p]["split"] == "test" for p in flagged)
    assert all(r["split"] == "train" for r in rows.values()
               if r["status"] == "kept" and r["label"] == "good" and r["path"] not in flagged)


def test_command_line_manifest_mode(tmp_path, mtd_like):
    root, paths, truth = mtd_like
    ws = str(tmp_path / "ws")
    runner = CliRunner()
    assert runner.invoke(cli, ["ingest", "mtd", str(root), "-w", ws]).exit_code == 0
    result = runner.invoke(cli, ["filter-noise", "-w", ws, "--image-size", "128", "--batch-size",
                                 "12", "--hard-normals", "2", "--json"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    (summary,) = json.loads(result.stdout)
    assert summary["stage"] == "ssfilter"
    assert summary["dropped_here"]["noise_filter"] >= truth.sum()
    assert summary["flagged_here"] == {"hard_normal": 2}


def test_no_drop_flags_the_most_anomalous_of_all(tmp_path, mtd_like):
    """drop=False (a set already checked by hand): nothing leaves, the top K are flagged."""
    root, paths, truth = mtd_like
    m = run_ssfilter(tmp_path / "ws", root, drop=False, hard_normals=4)
    assert m.header["counts"]["dropped"] == 0
    scored = sorted((r for r in m.rows() if "ssfilter.score" in r["measures"]),
                    key=lambda r: -r["measures"]["ssfilter.score"])
    flagged = [r["path"] for r in scored if any(f["code"] == "hard_normal" for f in r["flags"])]
    assert flagged == [r["path"] for r in scored[:4]]


def test_randconv_leaves_the_frame_out_and_keeps_small_defects():
    """The border: a dark strip along one side (a fixture edge) moves the patches much less
    than with no border (it still shifts the image's statistics a little everywhere); a small
    hole in the middle moves the cells around it several times more."""
    from curate.stages.ssfilter.features import RandomConvDescriptor

    rng = np.random.default_rng(3)
    plain = texture(rng, 256)
    strip, hole = plain.copy(), plain.copy()
    strip[:, :6] = 20                                  # 2.3 % of the width
    cv2.circle(hole, (128, 120), 5, 20, -1)

    def moved(border, other):
        desc = RandomConvDescriptor(256, border=border)
        a, b = desc.describe([plain, other])
        return (a - b).norm(dim=1)                     # per cell

    framed, unframed = moved(0.04, strip), moved(0.0, strip)
    assert framed.max() < 0.75 * unframed.max()
    by_hole = moved(0.04, hole)
    assert by_hole.max() > 5 * framed.max()
    assert int((by_hole > 0.5 * by_hole.max()).sum()) <= 4   # local: a few cells of 64
    with pytest.raises(ValueError, match="border"):
        SSFilterParams(border=0.5)

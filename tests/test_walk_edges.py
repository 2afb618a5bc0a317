"""The one tree walk at the edges (issue 16): links, special files, odd names, unreadable
folders, a workspace inside its source. Nothing outside the source folder is read, nothing
crashes, and every entry is accounted for exactly once."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from helpers import assert_every_file_accounted_for, by_path, ingest, mtd_subset

from curate.app.cli import cli
from curate.core.errors import CurateError, UnsafePathError
from curate.core.files import source_file_path, walk_files
from curate.engine.verify import verify
from curate.engine.workspace import Workspace


def ignored(manifest) -> dict[str, str]:
    (inventory,) = manifest.header["inventory"].values()
    return {e["path"]: e["why"] for e in inventory["ignored"]}


def walk(root: Path, **kw) -> tuple[list[str], dict[str, str]]:
    skipped: dict[str, str] = {}
    files = list(walk_files(root, on_skip=skipped.__setitem__, **kw))
    return files, skipped


@pytest.fixture
def tiles(tmp_path, mtd_root) -> Path:
    """Real MTD files (hard links) in the MTD layout: 3 good tiles, 2 cracked."""
    return mtd_subset(mtd_root, tmp_path / "mtd", {"MT_Free": 3, "MT_Crack": 2})


def test_links_leading_outside_are_listed_never_read(ctx, tiles, tmp_path, mtd_root):
    # Before: a file link out of the root was ingested (and exported, and verified "OK").
    outside = sorted((mtd_root / "MT_Blowhole" / "Imgs").glob("*.jpg"))[0]
    imgs = tiles / "MT_Free" / "Imgs"
    (imgs / "stolen.jpg").symlink_to(outside)
    (imgs / "stolen.png").symlink_to(outside.with_suffix(".png"))
    (imgs / "folder_link").symlink_to(mtd_root / "MT_Break")           # folder, outside
    (tiles / "MT_Crack" / "again").symlink_to(tiles / "MT_Free")       # folder, inside
    (imgs / "broken.jpg").symlink_to(tmp_path / "nowhere.jpg")
    (imgs / "loop_a.jpg").symlink_to(imgs / "loop_b.jpg")
    (imgs / "loop_b.jpg").symlink_to(imgs / "loop_a.jpg")
    os.mkfifo(imgs / "pipe.jpg")  # opening it would block the ingest forever
    first = sorted(imgs.glob("exp*.jpg"))[0]
    (imgs / "alias.jpg").symlink_to(first)                              # file, inside
    (imgs / "alias.png").symlink_to(first.with_suffix(".png"))

    m = ingest(ctx, "mtd", tiles)
    rows = by_path(m)
    assert "MT_Free/Imgs/stolen.jpg" not in rows
    assert rows["MT_Free/Imgs/alias.jpg"]["status"] == "kept"  # read through the link
    assert rows["MT_Free/Imgs/alias.jpg"]["sha256"] == rows[f"MT_Free/Imgs/{first.name}"]["sha256"]
    assert len(rows) == 3 + 2 + 1
    why = ignored(m)
    for name in ("stolen.jpg", "stolen.png", "folder_link"):
        assert "outside the source folder" in why[f"MT_Free/Imgs/{name}"], name
    assert "link to a folder" in why["MT_Crack/again"]
    for name in ("broken.jpg", "loop_a.jpg", "loop_b.jpg"):
        assert "broken, or a loop" in why[f"MT_Free/Imgs/{name}"], name
    assert "FIFO" in why["MT_Free/Imgs/pipe.jpg"]
    assert_every_file_accounted_for(m, tiles)
    (inventory,) = m.header["inventory"].values()
    assert inventory["files"] == 10 + 2 + 8  # hard-linked files, alias links, entries left out
    assert verify(m, ctx) == []


def test_a_link_swapped_after_ingest_is_refused_when_read(ctx, tiles, mtd_root):
    imgs = tiles / "MT_Free" / "Imgs"
    first = sorted(imgs.glob("exp*.jpg"))[0]
    (imgs / "alias.jpg").symlink_to(first)
    m = ingest(ctx, "mtd", tiles)
    assert verify(m, ctx) == []
    (imgs / "alias.jpg").unlink()
    (imgs / "alias.jpg").symlink_to(sorted((mtd_root / "MT_Break" / "Imgs").glob("*.jpg"))[0])
    problems = verify(m, ctx)
    assert len(problems) == 1 and "alias.jpg" in problems[0]
    assert "leads outside its folder" in problems[0]
    with pytest.raises(UnsafePathError, match="leads outside"):
        source_file_path(tiles, "MT_Free/Imgs/alias.jpg")
    (imgs / "alias.jpg").unlink()
    os.mkfifo(imgs / "alias.jpg")
    with pytest.raises(UnsafePathError, match="FIFO"):
        source_file_path(tiles, "MT_Free/Imgs/alias.jpg")
    # A missing file is the caller's to report; the check itself does not fail on it.
    assert source_file_path(tiles, "MT_Free/Imgs/gone.jpg") == imgs / "gone.jpg"


def test_source_root_given_through_a_link_is_walked(tiles, tmp_path):
    link = tmp_path / "tiles-link"
    link.symlink_to(tiles)
    assert walk(link) == walk(tiles)
    rel = walk(tiles)[0][0]
    assert source_file_path(link, rel) == tiles / rel  # resolved: the file checked is read


def test_names_that_are_not_utf8_are_listed_escaped(ctx, tiles):
    imgs = os.fsencode(tiles / "MT_Free" / "Imgs")
    with open(os.path.join(imgs, b"caf\xe9.jpg"), "wb") as fh:
        fh.write(b"not read")
    os.mkdir(os.path.join(os.fsencode(tiles), b"MT_\xff"))
    with open(os.path.join(os.fsencode(tiles), b"MT_\xff", b"x.jpg"), "wb") as fh:
        fh.write(b"not read")
    (tiles / "MT_Free" / "Imgs" / "back\\slash.jpg").write_bytes(b"not read")

    m = ingest(ctx, "mtd", tiles)  # before: writing the manifest raised UnicodeEncodeError
    why = ignored(m)
    assert "not valid UTF-8" in why["MT_Free/Imgs/caf\\xe9.jpg"]
    assert "nor anything inside it" in why["MT_\\xff"]
    assert "safe relative path" in why["MT_Free/Imgs/back\\slash.jpg"]
    assert len(m.row_list()) == 5
    assert_every_file_accounted_for(m, tiles)
    json.dumps(m.header, ensure_ascii=False).encode("utf-8")  # printable, encodable


def test_an_unreadable_folder_is_listed_not_a_crash(ctx, tiles, monkeypatch):
    crack = os.fspath(tiles / "MT_Crack" / "Imgs")
    real_scandir = os.scandir

    def scandir(path="."):
        if os.fspath(path) == crack:
            raise PermissionError(13, "Permission denied", crack)
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    m = ingest(ctx, "mtd", tiles)
    assert ignored(m)["MT_Crack/Imgs"].startswith("unreadable folder: Permission denied")
    assert {r["label"] for r in m.row_list()} == {"good"}
    assert_every_file_accounted_for(m, tiles)
    # The root itself unreadable: one sentence, not a traceback.
    monkeypatch.setattr(os, "scandir", lambda path=".": (_ for _ in ()).throw(
        PermissionError(13, "Permission denied", os.fspath(path))))
    with pytest.raises(CurateError, match="cannot read the folder"):
        list(walk_files(tiles))


def test_unreadable_entries_for_real(tmp_path, mtd_root):
    """chmod 000 on a folder and on one image, read by a process the modes apply to. The suite
    runs as root here and in CI, and root reads everything: then the command runs in a new user
    namespace (`unshare --user`), where root's capabilities no longer cover the files, so the
    modes hold as for any user (a real unreadable folder, not a monkeypatched scandir)."""
    prefix: list[str] = []
    if os.geteuid() == 0:
        if shutil.which("unshare") is None:
            pytest.skip("running as root and util-linux's `unshare` is missing: "
                        "nothing can make a folder unreadable to root")
        prefix = ["unshare", "--user"]
    tiles = mtd_subset(mtd_root, tmp_path / "mtd", {"MT_Free": 3, "MT_Crack": 2})
    secret = sorted((tiles / "MT_Free" / "Imgs").glob("*.jpg"))[0]
    # A copy, not the hard link: chmod on a hard link would change the shared data's mode.
    data = secret.read_bytes()
    secret.unlink()
    secret.write_bytes(data)
    secret.chmod(0)
    (tiles / "MT_Crack" / "Imgs").chmod(0)
    ws = tmp_path / "ws"
    curate = Path(sys.executable).with_name("curate")
    try:
        done = subprocess.run([*prefix, str(curate), "ingest", "mtd", str(tiles), "-w", str(ws),
                               "--json"], capture_output=True, text=True, timeout=120)
    finally:
        (tiles / "MT_Crack" / "Imgs").chmod(0o755)
        secret.chmod(0o644)
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr
    m = Workspace.open(ws, create=False).load()
    assert ignored(m)["MT_Crack/Imgs"].startswith("unreadable folder")
    rows = by_path(m)
    assert len(rows) == 3  # the three good tiles; the cracked ones could not be listed
    rel = f"MT_Free/Imgs/{secret.name}"
    assert rows[rel]["status"] == "dropped"
    assert "Permission denied" in rows[rel]["reasons"][0]["detail"], rows[rel]["reasons"]
    inventory = m.header["inventory"]["mtd"]
    assert inventory["files"] == 3 * 2 + 1  # 3 tiles with masks + the folder it could not list


def test_nothing_readable_is_one_sentence(ctx, tmp_path, mtd_root):
    root = tmp_path / "links"
    (root / "MT_Free" / "Imgs").mkdir(parents=True)
    jpg = sorted((mtd_root / "MT_Free" / "Imgs").glob("*.jpg"))[0]
    (root / "MT_Free" / "Imgs" / jpg.name).symlink_to(jpg)
    with pytest.raises(CurateError, match=r"no file curate may read \(1 entries left out"):
        ingest(ctx, "mtd", root)


def test_a_workspace_inside_its_source_is_left_out(tiles):
    ws = tiles / "ws"
    runner = CliRunner()
    ids = []
    for _ in range(2):
        # The cache would hide a changing id: each run recomputes (cache entries removed).
        for entry in (ws / "cache").glob("*") if ws.exists() else ():
            entry.unlink()
        result = runner.invoke(cli, ["ingest", "mtd", str(tiles), "-w", str(ws), "--json"])
        assert result.exit_code == 0, result.output
        ids.append(json.loads(result.stdout)[0]["manifest"])
    assert ids[0] == ids[1]  # before: the walk saw the workspace's files, a new id each run
    again = runner.invoke(cli, ["ingest", "mtd", str(tiles), "-w", str(ws), "--json"])
    assert json.loads(again.stdout)[0]["from_cache"] is True
    shown = json.loads(runner.invoke(cli, ["manifest", "show", "-w", str(ws), "--json"]).stdout)
    (inventory,) = shown["header"]["inventory"].values()
    assert [e["path"] for e in inventory["ignored"]] == ["ws"]
    assert "workspace" in inventory["ignored"][0]["why"]
    # The source folder itself as the workspace: refused in one sentence, nothing written.
    itself = runner.invoke(cli, ["ingest", "mtd", str(tiles), "-w", str(tiles)])
    assert itself.exit_code in (1, 2) and "Traceback" not in itself.output
    assert not (tiles / "manifests").exists()


def test_an_unreadable_folder_among_the_sources_is_not_a_crash(tmp_path, monkeypatch):
    from curate.sources import READERS
    from curate.sources import discover as discovering

    (tmp_path / "locked").mkdir()

    def unreadable(path):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(READERS["kolektorsdd"], "looks_like", staticmethod(unreadable))
    found, missing = discovering.discover(tmp_path, ["kolektorsdd"], {}, {})
    assert not found and "no folder named" in missing["kolektorsdd"]
    monkeypatch.setattr(Path, "iterdir", unreadable)
    with pytest.raises(CurateError, match="cannot list the folder of sources"):
        discovering.discover(tmp_path, ["kolektorsdd"], {}, {})

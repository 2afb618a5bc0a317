"""The command line: every command, --json, exit codes 0/1/2, --help with an example."""

from __future__ import annotations

import json
import shutil

import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from curate.app.cli import cli
from curate.core.manifest import HEADER_KEY


@pytest.fixture
def small_mtd(tmp_path, mtd_root):
    """A few real MTD images in the original layout (copied to a temporary folder)."""
    root = tmp_path / "mtd"
    for cls, n in (("Free", 6), ("Blowhole", 3), ("Crack", 2)):
        src = mtd_root / f"MT_{cls}" / "Imgs"
        dst = root / f"MT_{cls}" / "Imgs"
        dst.mkdir(parents=True)
        for jpg in sorted(src.glob("*.jpg"))[:n]:
            shutil.copy(jpg, dst)
            shutil.copy(jpg.with_suffix(".png"), dst)
    return root


def invoke(*args, code=0):
    result = CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)
    assert result.exit_code == code, result.output
    return result


def test_ingest_labels_export_with_json(tmp_path, small_mtd):
    ws = tmp_path / "ws"
    out = json.loads(invoke("ingest", "mtd", small_mtd, "-w", ws, "--json", "-j", "1").stdout)
    assert out[0]["stage"] == "ingest" and out[0]["samples"] == 11
    ingest_id = out[0]["manifest"]
    out = json.loads(invoke("labels", "-w", ws, "--json").stdout)
    assert out[0]["stage"] == "labels" and out[0]["kept"] == 11
    again = json.loads(invoke("labels", ingest_id[:8], "-w", ws, "--json").stdout)
    assert again[0]["from_cache"] is True
    out = json.loads(invoke("export", "mvtec", "--out", tmp_path / "x", "-w", ws,
                            "--json").stdout)
    assert out["written"] == 11
    assert out["counts"]["Magnetic-tile-defect"]["test"] == {"Blowhole": 3, "Crack": 2,
                                                              "good": 6}
    listing = json.loads(invoke("manifest", "list", "-w", ws, "--json").stdout)
    assert [m["stage"] for m in listing] == ["ingest", "labels"] and listing[-1]["latest"]
    shown = json.loads(invoke("manifest", "show", "-w", ws, "--rows", "2", "--json").stdout)
    assert shown["header"]["parents"] == [ingest_id] and len(shown["rows"]) == 2
    d = json.loads(invoke("manifest", "diff", ingest_id, "latest", "-w", ws, "--json").stdout)
    assert len(d["changed"]) == 11 and not d["added"] and not d["removed"]
    assert "Magnetic-tile-defect/test: Blowhole 3" in invoke("export", "mvtec", "--out",
                                                      tmp_path / "x", "--overwrite",
                                                      "-w", ws).stdout


def test_human_output_lists_inventory(tmp_path, small_mtd):
    (small_mtd / "README.txt").write_text("notes")
    out = invoke("ingest", "mtd", small_mtd, "-w", tmp_path / "ws").stdout
    assert "1 ignored" in out
    shown = invoke("manifest", "show", "-w", tmp_path / "ws").stdout
    assert "README.txt" in shown


def test_verify_catches_a_hand_edited_manifest(tmp_path, small_mtd):
    ws = tmp_path / "ws"
    invoke("ingest", "mtd", small_mtd, "-w", ws)
    assert "OK" in invoke("manifest", "verify", "-w", ws).stdout
    path = next((ws / "manifests").glob("*.parquet"))
    table = pq.read_table(path)
    labels = table.column("label").to_pylist()
    labels[0] = "Crack" if labels[0] != "Crack" else "good"
    table = table.set_column(table.schema.get_field_index("label"), "label", [labels])
    pq.write_table(table.replace_schema_metadata(
        {HEADER_KEY: pq.read_schema(path).metadata[HEADER_KEY]}), path)
    result = invoke("manifest", "verify", "-w", ws, "--json", code=1)
    report = json.loads(result.stdout)
    assert not report["ok"]
    assert any("changed after it was written" in p for p in report["problems"])


def test_verify_catches_a_changed_original(tmp_path, small_mtd):
    ws = tmp_path / "ws"
    invoke("ingest", "mtd", small_mtd, "-w", ws)
    victim = sorted((small_mtd / "MT_Crack" / "Imgs").glob("*.jpg"))[0]
    victim.write_bytes(victim.read_bytes() + b"\0")
    result = invoke("manifest", "verify", "-w", ws, code=1)
    assert victim.name in result.stderr and "changed since ingest" in result.stderr
    assert "OK" in invoke("manifest", "verify", "-w", ws, "--no-originals").stdout


def test_exit_codes_and_one_sentence_errors(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    result = invoke("ingest", "mtd", empty, "-w", tmp_path / "ws", code=1)
    assert "empty" in result.stderr and "Traceback" not in result.output
    result = invoke("ingest", "mtd", tmp_path / "nope", "-w", tmp_path / "ws", code=1)
    assert "not a folder" in result.stderr
    invoke("ingest", "nosuchkind", empty, code=2)
    invoke("labels", "--jobs", "0", "-w", tmp_path / "ws", code=2)
    assert not (tmp_path / "ws").exists()  # the failed ingests left no workspace behind
    result = invoke("labels", "-w", tmp_path / "ws", code=1)
    assert "not a curate workspace" in result.stderr
    result = invoke("ingest", "mtd", empty, "-o", "nonsense", "-w", tmp_path / "ws", code=2)


@pytest.mark.parametrize("command", [
    ["ingest"], ["labels"], ["merge"], ["manifest", "list"], ["manifest", "show"],
    ["manifest", "diff"], ["manifest", "verify"], ["export", "mvtec"], ["dedup"], ["quality"],
    ["build"], ["card"], ["review", "push"], ["review", "open"], ["review", "pull"],
])
def test_every_command_has_help_with_an_example(command):
    out = invoke(*command, "--help").stdout
    assert "Example" in out and "--json" in out
    # `review open` serves a FiftyOne dataset by name: it reads no workspace.
    assert ("--workspace" in out) == (command != ["review", "open"])

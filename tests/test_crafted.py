"""Crafted checkpoints (issue 13, items 1-9): hostile checkpoints built by hand with
:mod:`ray_ckpt.format.manifest` (builders in benchmarks/crafted.py, no Ray), each refused with a
:class:`~ray_ckpt.CheckpointError` by the reader and every tool before anything is allocated,
and by the CLI with one line and exit status 1 (2 for a usage error), never a traceback.

Each test failed on the code before issue 13 (noted per test: what happened then)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from benchmarks import crafted
from ray_ckpt import CheckpointReader, cli, list_checkpoints
from ray_ckpt.errors import CheckpointError, CorruptCheckpointError, UnsupportedValueError
from ray_ckpt.tools import diff_checkpoints, export_checkpoint, inspect_checkpoint, verify

GiB = 1 << 30


def refused_everywhere(path: Path, words: str, tmp_path: Path) -> None:
    """read, inspect, diff and export raise a CorruptCheckpointError saying ``words``; verify
    reports it; the CLI prints one line naming it and exits 1."""
    for action in (
        lambda: CheckpointReader().read(str(path)),
        lambda: inspect_checkpoint(str(path)),
        lambda: diff_checkpoints(str(path), str(path)),
        lambda: export_checkpoint(str(path), str(tmp_path / "out"), to="safetensors"),
        lambda: export_checkpoint(str(path), str(tmp_path / "out.pt"), to="torch"),
    ):
        with pytest.raises(CorruptCheckpointError, match=words):
            action()
    report = verify(str(path))
    assert not report.ok
    assert any(words in p.message for p in report.problems), report.problems


def cli_run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    status = cli.main(list(argv))
    out, err = capsys.readouterr()
    return status, out, err


def cli_fails(capsys: pytest.CaptureFixture[str], *argv: str, words: str, status: int = 1) -> None:
    """The command exits ``status`` naming ``words``: an error is one line on stderr; verify
    prints its report (FAILED and one line per problem) on stdout."""
    code, out, err = cli_run(capsys, *argv)
    assert code == status
    if argv[0] == "verify" and status == 1:
        assert out.startswith("FAILED") and words in out and not err, (out, err)
    else:
        assert err.count("\n") == 1 and words in err, err


# --- 1: zero-length extents ------------------------------------------------------------------


def test_zero_length_extents_cannot_hide_shared_bytes(tmp_path: Path) -> None:
    # before: loaded 16 tensors of 256 KiB from one 256 KiB range, and verify said OK
    path = crafted.zero_length_overlap(tmp_path / "c", copies=16, elements=1 << 16)
    refused_everywhere(path, "overlap", tmp_path)


def test_a_zero_length_extent_inside_another_is_refused(tmp_path: Path) -> None:
    c = crafted.Crafter(tmp_path / "c")
    big = c.add("big", torch.ones(64))
    empty = c.add("empty", torch.zeros(0), offset=64 + 32)
    path = c.write({"d": [["big", {"T": big}], ["empty", {"T": empty}]]})
    refused_everywhere(path, "overlap", tmp_path)


# --- 2: shards that do not tile ----------------------------------------------------------------


def test_shards_with_the_same_box_are_refused(tmp_path: Path) -> None:
    # before: read returned a tensor whose second half was never written; verify said OK
    refused_everywhere(crafted.same_box_shards(tmp_path / "c"), "overlap", tmp_path)


def test_shards_of_another_dtype_or_global_shape_are_refused(tmp_path: Path) -> None:
    c = crafted.Crafter(tmp_path / "c")
    a = c.add("w", torch.ones(4), global_shape=(8,), global_offset=(0,))
    b = c.add("w", torch.ones(4, dtype=torch.float64), global_shape=(8,), global_offset=(4,))
    path = c.write({"d": [["w", {"D": {"i": [a, b], "g": [8]}}]]})
    refused_everywhere(path, "dtypes", tmp_path)
    c = crafted.Crafter(tmp_path / "d")
    a = c.add("w", torch.ones(4), global_shape=(8,), global_offset=(0,))
    b = c.add("w", torch.ones(4), global_shape=(9,), global_offset=(4,))
    path = c.write({"d": [["w", {"D": {"i": [a, b], "g": [8]}}]]})
    refused_everywhere(path, "not a box", tmp_path)


# --- 3: world size ---------------------------------------------------------------------------


@pytest.mark.timeout(120)
def test_a_huge_world_size_fails_fast(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # before: verify decoded the tree once per rank, 10**12 times
    path = crafted.huge_world_size(tmp_path / "c")
    refused_everywhere(path, "world_size", tmp_path)
    cli_fails(capsys, "verify", "-q", str(path), words="world_size")


def test_world_size_is_bounded_by_the_trees_present(tmp_path: Path) -> None:
    """Per-rank trees, where a checkpoint has them, are one per rank; without them the union
    tree serves every rank, so the world size changes nothing that is read."""
    tree = {"d": [["w", {"T": 0}]]}
    path = crafted.plain(tmp_path / "c", marker={"world_size": 5}, trees=[tree] * 2)
    refused_everywhere(path, "trees of 2", tmp_path)
    union = crafted.plain(tmp_path / "u", marker={"world_size": 5})
    assert verify(str(union)).ok


# --- 4: sparse marker and manifest -----------------------------------------------------------


@pytest.mark.parametrize("build", [crafted.sparse_marker, crafted.sparse_manifest])
@pytest.mark.parametrize("command", ["verify", "inspect"])
def test_a_huge_sparse_marker_or_manifest_is_not_read(
    tmp_path: Path, build: object, command: str
) -> None:
    # before: verify reached 8.8 GB of RSS, inspect 2.5 GB, reading the 2 GiB whole
    path = build(tmp_path / "c")  # type: ignore[operator]
    result = crafted.run_cli([command, "-q", str(path)])
    assert result["rc"] == 1, result
    assert "not read" in result["stderr"] or "not read" in result["stdout"], result
    assert "Traceback" not in result["stderr"]
    assert result["peak_rss_bytes"] < 1 * GiB, result["peak_rss_bytes"]


# --- 5: deep JSON ----------------------------------------------------------------------------


@pytest.mark.parametrize("build", [crafted.deep_marker, crafted.deep_trees])
def test_deeply_nested_json_is_a_checkpoint_error(tmp_path: Path, build: object) -> None:
    # before: a raw RecursionError from every one of these
    path = build(tmp_path / "c")  # type: ignore[operator]
    refused_everywhere(path, "nests deeper", tmp_path)


def test_one_bad_directory_does_not_break_ls(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # before: list_checkpoints (so ls and CheckpointManager) raised RecursionError
    crafted.plain(tmp_path / "step-1")
    crafted.deep_marker(tmp_path / "step-2")
    crafted.sparse_marker(tmp_path / "step-3")
    entries = {e.name: e for e in list_checkpoints(str(tmp_path))}
    assert entries["step-1"].committed and entries["step-1"].problem is None
    assert "nests deeper" in (entries["step-2"].problem or "")
    assert "not read" in (entries["step-3"].problem or "")
    assert not entries["step-2"].committed
    code, out, err = cli_run(capsys, "ls", str(tmp_path))
    assert code == 0
    assert "committed" in out and out.count("bad") == 2, out
    assert "step-2: bad:" in err


# --- 6: an unresolvable URI ------------------------------------------------------------------


def test_an_unresolvable_uri_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    # before: AttributeError (pyarrow.fs.ArrowInvalid does not exist) with a traceback
    cli_fails(capsys, "inspect", "foo://x/y", words="cannot resolve storage URI", status=2)
    cli_fails(capsys, "verify", "foo://x/y", words="cannot resolve storage URI", status=2)


# --- 7: numbers in the marker ----------------------------------------------------------------


@pytest.mark.parametrize("build", [crafted.infinite_time, crafted.huge_time])
def test_an_absurd_commit_time_is_refused(
    tmp_path: Path, build: object, capsys: pytest.CaptureFixture[str]
) -> None:
    # before: OverflowError traceback in inspect and ls
    path = build(tmp_path / "step-7")  # type: ignore[operator]
    refused_everywhere(path, "created_unix", tmp_path)
    cli_fails(capsys, "inspect", str(path), words="created_unix")
    code, out, _ = cli_run(capsys, "ls", str(tmp_path))
    assert code == 0 and "bad" in out


def test_marker_numbers_out_of_range_are_refused(tmp_path: Path) -> None:
    path = crafted.plain(tmp_path / "c", marker={"manifest_crc32c": 2**40})
    refused_everywhere(path, "manifest_crc32c", tmp_path)


# --- 8: other shapes that escaped as non-CheckpointErrors ----------------------------------


def test_a_numpy_tag_on_bfloat16_is_refused(tmp_path: Path) -> None:
    # before: TypeError from read; verify said OK
    refused_everywhere(crafted.numpy_bfloat16(tmp_path / "c"), "numpy", tmp_path)


def test_a_shape_whose_strides_overflow_is_refused(tmp_path: Path) -> None:
    # before: RuntimeError (stride calculation overflowed) from read; verify said OK
    refused_everywhere(crafted.stride_overflow(tmp_path / "c"), "overflows", tmp_path)


def test_a_huge_global_shape_is_refused_before_allocating(tmp_path: Path) -> None:
    # before: read tried to allocate 4 TiB (RuntimeError); verify and inspect said OK
    refused_everywhere(crafted.huge_global_shape(tmp_path / "c"), "a shard is missing", tmp_path)


def test_diff_of_bits16_checkpoints(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # before: NotImplementedError ("index_cpu" not implemented for 'Bits16')
    a = crafted.bits16(tmp_path / "a", fill=1)
    b = crafted.bits16(tmp_path / "b", fill=2)
    report = diff_checkpoints(str(a), str(b))
    (change,) = report.changed
    assert (change.key, change.what, change.numel_changed, change.max_abs_diff) == (
        "b", "values", 4, None
    )
    assert diff_checkpoints(str(a), str(a)).same
    code, out, _ = cli_run(capsys, "diff", str(a), str(b))
    assert code == 0 and "~ b" in out


# --- 9: keys that are terminal escapes, names safetensors reserves ------------------------


def test_keys_are_printed_escaped(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # before: ESC and BEL went raw to the terminal from inspect and diff
    evil = crafted.escape_keys(tmp_path / "run" / "step-1\x1b[31m")
    plain = crafted.plain(tmp_path / "plain")
    outputs = []
    for argv in (
        ["inspect", str(evil)],
        ["diff", str(plain), str(evil)],
        ["ls", str(tmp_path / "run")],
        ["verify", str(evil)],
    ):
        code, out, err = cli_run(capsys, *argv)
        assert code == 0, (argv, err)
        outputs.append(out + err)
    for text in outputs:
        assert "\x1b" not in text and "\x07" not in text, text
    assert "evil\\x1b[2J" in outputs[0] and "\\x07" in outputs[0]
    assert "+ evil\\x1b[2J" in outputs[1]
    assert "step-1\\x1b[31m" in outputs[2]


def test_an_error_naming_a_hostile_key_is_one_escaped_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    c = crafted.Crafter(tmp_path / "c")
    key = "line\nbreak\x1b[2J"
    c.add(key, torch.ones(4), global_shape=(8,), global_offset=(0,))
    c.add(key, torch.ones(4), global_shape=(8,), global_offset=(0,))
    path = c.write({"d": [[key, {"D": {"i": [0, 1], "g": [8]}}]]})
    code, _, err = cli_run(capsys, "inspect", str(path))
    assert code == 1 and err.count("\n") == 1 and "\x1b" not in err, err


def test_export_refuses_a_key_safetensors_reserves(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # before: wrote a file the safetensors library could not read
    path = crafted.metadata_key(tmp_path / "c")
    with pytest.raises(UnsupportedValueError, match="__metadata__"):
        export_checkpoint(str(path), str(tmp_path / "out"), to="safetensors")
    assert not list((tmp_path / "out").glob("*.safetensors"))
    cli_fails(capsys, "export", str(path), "--to", "safetensors", str(tmp_path / "out2"),
              words="reserves")
    # torch export has no such reserved name
    result = export_checkpoint(str(path), str(tmp_path / "m.pt"), to="torch")
    assert torch.load(result.out)["__metadata__"].tolist() == list(range(6))


# --- the crafted builders make valid checkpoints when not told otherwise -----------------


def test_the_crafter_writes_valid_checkpoints(tmp_path: Path) -> None:
    c = crafted.Crafter(tmp_path / "c")
    w = c.add("w", torch.arange(8.0).reshape(2, 4))
    s0 = c.add("s", torch.arange(4.0).reshape(2, 2), global_shape=(2, 4), global_offset=(0, 0))
    s1 = c.add("s", torch.arange(4.0, 8.0).reshape(2, 2), global_shape=(2, 4),
               global_offset=(0, 2))
    e = c.add("e", torch.zeros(0))
    path = c.write({"d": [["w", {"T": w}], ["s", {"D": {"i": [s0, s1], "g": [2, 4]}}],
                          ["e", {"T": e}], ["n", {"N": w}]]})
    assert verify(str(path)).ok
    state, _ = CheckpointReader().read(str(path))
    assert torch.equal(state["s"], torch.tensor([[0.0, 1, 4, 5], [2, 3, 6, 7]]))
    assert state["n"].tolist() == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert json.loads((path / "ray_ckpt.commit").read_text())["world_size"] == 1
    with pytest.raises(CheckpointError):
        CheckpointReader().read(str(crafted.plain(tmp_path / "p", marker={"total_nbytes": 1})))

"""A reader that closes the pipe early (`status | head`) ends the command quietly, never `error: Broken pipe`."""

from __future__ import annotations

import io
import os
import sys

from pipeline.cli import main


class ClosedPipe(io.TextIOWrapper):
    """stdout whose reader has gone: every write raises BrokenPipeError, as a closed pipe does."""

    def __init__(self, fd: int) -> None:
        super().__init__(os.fdopen(fd, "wb", closefd=False))

    def write(self, text: str) -> int:  # type: ignore[override]
        raise BrokenPipeError(32, "Broken pipe")


def test_status_into_a_closed_pipe_is_quiet_and_exit_0(tmp_path, capsys, monkeypatch, market):
    idx = tmp_path / "i.json"
    assert main(["prepare", "--root", str(market), "--out", str(idx)]) == 0
    out = tmp_path / "o"
    assert main(["run", "--index", str(idx), "--out", str(out), "--backend", "offline", "--no-dashboard"]) == 0
    capsys.readouterr()
    read_end, write_end = os.pipe()
    saved = os.dup(1)
    try:
        monkeypatch.setattr(sys, "stdout", ClosedPipe(write_end))
        code = main(["status", "--out", str(out), "--json"])
    finally:
        os.dup2(saved, 1)
        for fd in (saved, read_end, write_end):
            os.close(fd)
    assert code == 0
    assert "Broken pipe" not in capsys.readouterr().err

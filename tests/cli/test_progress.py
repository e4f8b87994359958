"""Progress: a status line on a terminal for steps over a second, nothing elsewhere."""

import io
import time

from onnx_pathcond import progress as progress_module
from onnx_pathcond.progress import Progress
from support import repo


class FakeTerminal(io.StringIO):
    def isatty(self):
        return True


def test_slow_step_shows_a_status_line_on_a_terminal(monkeypatch):
    monkeypatch.setattr(progress_module, "SHOW_AFTER", 0.05)
    out = FakeTerminal()
    p = Progress(stream=out)
    p("statistics", 1, 10)
    time.sleep(0.3)
    p("statistics", 7, 10)
    p("solve")  # a quick step: never shown
    p.close()
    text = out.getvalue()
    assert "statistics 7/10" in text and "\r" in text
    assert "solve" not in text
    assert text.endswith("\r\033[K")  # the line is erased when the step ends


def test_fast_steps_show_nothing_on_a_terminal():
    out = FakeTerminal()
    p = Progress(stream=out)
    p("load")
    p("analyse")
    p.close()
    assert out.getvalue() == ""


def test_nothing_on_a_non_terminal_unless_verbose(tmp_path, invoke_cli):
    quiet = invoke_cli(repo.model("cnn.onnx"), tmp_path / "a.onnx")
    assert quiet.exit_code == 0 and quiet.stderr == ""
    loud = invoke_cli(repo.model("cnn.onnx"), tmp_path / "b.onnx", "-v")
    assert loud.exit_code == 0
    for step in ("load", "analyse", "statistics", "solve", "rewrite", "verify", "save"):
        assert f"... {step}" in loud.stderr

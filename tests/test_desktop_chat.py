"""examples/desktop_chat.py in a real window on a virtual display (Xvfb), driven by xdotool.

The test starts Xvfb, opens the example's window in this process, types with real X key
events, presses Return, and pumps the Tk loop (as ``mainloop`` would) until the streamed
reply is in the window; it clicks Stop during a long reply; it saves a screenshot. Where
no X server can be started (no Xvfb or xdotool: ``apt-get install xvfb xdotool``) the test
is skipped with that reason.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from edgellm.model import Model
from edgellm.runtimes.fake import FakeEngine

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "desktop_chat.py"


@pytest.fixture(scope="session")
def display() -> Iterator[str]:
    """A fresh Xvfb display, e.g. ":57", for the whole run.

    Session-scoped on purpose: Tk keeps its connection to a display open after its last
    window is destroyed, and Xlib ends the process (exit 1, no message) when that server
    goes away. The tier ordering runs this module's real-tier test after other modules,
    so a module-scoped Xvfb was stopped and restarted in between, and the run died.
    """
    missing = [tool for tool in ("Xvfb", "xdotool") if shutil.which(tool) is None]
    if missing:
        pytest.skip(f"no X server can be started here: {', '.join(missing)} not installed "
                    "(apt-get install xvfb xdotool)")
    for n in range(57, 99):
        if not Path(f"/tmp/.X11-unix/X{n}").exists() and not Path(f"/tmp/.X{n}-lock").exists():
            break
    proc = subprocess.Popen(["Xvfb", f":{n}", "-screen", "0", "800x600x24", "-nolisten", "tcp"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while not Path(f"/tmp/.X11-unix/X{n}").exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.skip(f"Xvfb :{n} did not start (exit {proc.poll()})")
        time.sleep(0.05)
    try:
        yield f":{n}"
    finally:
        proc.terminate()
        proc.wait(10)


def _example() -> Any:
    spec = importlib.util.spec_from_file_location("desktop_chat", EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class Driver:
    """The example's window in this process, with real X input from xdotool."""

    def __init__(self, display: str, model: Any) -> None:
        import tkinter as tk

        self.display = display
        self.env = {**os.environ, "DISPLAY": display}
        self.root = tk.Tk(screenName=display)
        self.window = _example().ChatWindow(self.root, model)
        self.root.geometry("640x420+0+0")
        self.pump_until(lambda: self.root.winfo_viewable(), "the window to map")

    def pump_until(self, cond: Callable[[], Any], what: str, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while not cond():
            assert time.monotonic() < deadline, f"timed out waiting for {what}"
            self.root.update()
            time.sleep(0.005)

    def xdotool(self, *args: str) -> None:
        proc = subprocess.Popen(["xdotool", *args], env=self.env)
        self.pump_until(lambda: proc.poll() is not None, f"xdotool {' '.join(args)}")
        assert proc.returncode == 0

    def type_line(self, text: str) -> None:
        # No window manager on Xvfb: keys go where the pointer is, and a click focuses the entry.
        self.click(self.window.entry)
        self.pump_until(lambda: self.root.focus_get() is self.window.entry, "the entry's focus", timeout=10)
        self.xdotool("type", "--delay", "5", text)
        self.pump_until(lambda: self.window.entry.get() == text, "the typed text")
        self.xdotool("key", "Return")

    def click(self, widget: Any) -> None:
        x = widget.winfo_rootx() + widget.winfo_width() // 2
        y = widget.winfo_rooty() + widget.winfo_height() // 2
        self.xdotool("mousemove", str(x), str(y), "click", "1")

    def screenshot(self, path: Path) -> Path:
        tool = shutil.which("import")
        if tool:
            cmd = [tool, "-display", self.display, "-window", "root", str(path)]
        else:  # xwd from x11-apps writes XWD; keep it as it is
            path = path.with_suffix(".xwd")
            cmd = ["xwd", "-display", self.display, "-root", "-out", str(path)]
        proc = subprocess.Popen(cmd, env=self.env)
        self.pump_until(lambda: proc.poll() is not None, "the screenshot")
        assert proc.returncode == 0 and path.stat().st_size > 1000
        return path

    def close(self) -> None:
        self.window.close()


def _chat_roundtrip(display: str, model: Any, question: str, tmp_path: Path) -> str:
    driver = Driver(display, model)
    try:
        driver.type_line(question)
        window = driver.window
        driver.pump_until(lambda: not window.busy and window.status.cget("text").endswith("tok/s"),
                          "the reply to finish")
        shot = driver.screenshot(tmp_path / "desktop_chat.png")
        print(f"screenshot: {shot}")
        return driver.window.transcript()
    finally:
        driver.close()


def test_typed_text_streams_a_reply_into_the_window(display: str, tmp_path: Path) -> None:
    model = Model(FakeEngine(echo=True, step_seconds=0.01))  # type: ignore[arg-type]
    transcript = _chat_roundtrip(display, model, "Hello from a real keyboard", tmp_path)
    assert "You: Hello from a real keyboard\nAssistant: Hello from a real keyboard\n" in transcript


def test_stop_button_ends_a_long_reply(display: str) -> None:
    model = Model(FakeEngine(echo=True, step_seconds=0.02))  # type: ignore[arg-type]
    driver = Driver(display, model)
    try:
        driver.type_line("z" * 300)  # 300 tokens at 20 ms: 6 s unless stopped
        driver.pump_until(lambda: len(driver.window.reply) >= 5, "the first pieces")
        pieces_seen = len(driver.window.reply)  # the window kept updating while the model worked
        driver.click(driver.window.stop_button)
        driver.pump_until(lambda: not driver.window.busy, "the reply to stop", timeout=10)
        driver.pump_until(lambda: driver.window.status.cget("text") == "stopped", "the status")
        reply = "".join(driver.window.reply)
        assert pieces_seen >= 5 and 0 < len(reply) < 300
        assert str(driver.window.send_button.cget("state")) == "normal"
    finally:
        driver.close()


def test_smollm2_answers_in_the_window(display: str, smollm2_gguf: Path, tmp_path: Path) -> None:
    import edgellm

    model = edgellm.load(smollm2_gguf, n_ctx=1024)
    transcript = _chat_roundtrip(display, model, "What is the capital of France?", tmp_path)
    assert "Paris" in transcript.split("Assistant: ", 1)[1]


def test_a_bad_model_path_is_one_line(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, str(EXAMPLE), str(tmp_path / "missing.gguf")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.startswith("desktop_chat:") and proc.stderr.count("\n") == 1

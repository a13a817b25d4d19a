"""A small desktop chat (Tk) that embeds the runtime: no server, no torch.

    python samples/desktop_chat.py exports/smollm2-135m

Generation runs on the API's worker thread (DFlashModel.stream); its text pieces reach the window
through a queue that the Tk event loop drains every 30 ms, because Tk may only be touched from the thread
that runs it. Stop cancels the reply in flight.

--script "message" --screenshot out.png sends one message, waits for the reply, saves a screenshot of
the window and quits (how the tests drive it under a virtual display).
"""
from __future__ import annotations

import argparse
import queue
import sys
import tkinter as tk
from tkinter import scrolledtext

from dflash_edge.errors import UserError
from dflash_edge.runtime import load


class ChatWindow:
    def __init__(self, root: tk.Tk, model, max_new_tokens: int = 256):
        self.root, self.model, self.max_new_tokens = root, model, max_new_tokens
        self.history: list[dict] = []
        self.events: queue.Queue = queue.Queue()  # ("text", piece) | ("done", result, error), from the worker
        self.generation = None
        self.reply = ""
        root.title("dflash-edge chat")
        self.transcript = scrolledtext.ScrolledText(root, wrap="word", width=80, height=24, state="disabled")
        self.transcript.pack(fill="both", expand=True, padx=6, pady=6)
        bar = tk.Frame(root)
        bar.pack(fill="x", padx=6, pady=(0, 6))
        self.entry = tk.Entry(bar)
        self.entry.pack(side="left", fill="x", expand=True)
        self.entry.bind("<Return>", lambda _: self.send())
        self.send_button = tk.Button(bar, text="Send", command=self.send)
        self.send_button.pack(side="left", padx=(6, 0))
        self.stop_button = tk.Button(bar, text="Stop", command=self.stop, state="disabled")
        self.stop_button.pack(side="left", padx=(6, 0))
        self.status = tk.Label(root, anchor="w", text="ready")
        self.status.pack(fill="x", padx=6, pady=(0, 6))
        root.after(30, self.drain)

    def write(self, text: str) -> None:
        self.transcript.configure(state="normal")
        self.transcript.insert("end", text)
        self.transcript.see("end")
        self.transcript.configure(state="disabled")

    @property
    def busy(self) -> bool:
        return self.generation is not None

    def send(self) -> None:
        text = self.entry.get().strip()
        if not text or self.busy:
            return
        self.entry.delete(0, "end")
        self.history.append({"role": "user", "content": text})
        self.write(f"You: {text}\nAssistant: ")
        self.reply = ""
        try:
            self.generation = self.model.stream(
                self.history, self.max_new_tokens,
                on_text=lambda piece: self.events.put(("text", piece)),
                on_done=lambda result, error: self.events.put(("done", result, error)))
        except UserError as e:
            self.write(f"[{e}]\n\n")
            self.history.pop()
            return
        self.send_button.configure(state="disabled")
        self.stop_button.configure(state="normal")
        self.status.configure(text="generating…")

    def stop(self) -> None:
        if self.generation:
            self.generation.cancel()

    def drain(self) -> None:
        """On the Tk thread: apply what the worker sent since the last tick."""
        try:
            while True:
                event = self.events.get_nowait()
                if event[0] == "text":
                    self.reply += event[1]
                    self.write(event[1])
                else:
                    self.finish(*event[1:])
        except queue.Empty:
            pass
        self.root.after(30, self.drain)

    def finish(self, result, error) -> None:
        self.generation = None
        self.send_button.configure(state="normal")
        self.stop_button.configure(state="disabled")
        if error is not None:
            self.write(f"\n[error: {error}]\n\n")
            self.status.configure(text="error")
            return
        self.history.append({"role": "assistant", "content": result.text})
        s = result.stats
        self.write("\n\n")
        self.status.configure(text=f"{s.new_tokens} tokens, {s.decode_tokens_per_s:.1f} tok/s, tau {s.tau:.2f}, "
                                   f"{s.finish_reason}")


def screenshot(root: tk.Tk, path: str) -> None:
    from PIL import ImageGrab

    root.update()
    x, y = root.winfo_rootx(), root.winfo_rooty()
    ImageGrab.grab(bbox=(x, y, x + root.winfo_width(), y + root.winfo_height())).save(path)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="a folder written by dflash-export")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--script", default=None, help="send this message, wait for the reply, then quit")
    p.add_argument("--screenshot", default=None, help="with --script: save the window here before quitting")
    args = p.parse_args()
    try:
        model = load(args.model)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    root = tk.Tk()
    window = ChatWindow(root, model, args.max_new_tokens)
    if args.script:
        def run_script() -> None:
            window.entry.insert(0, args.script)
            window.send()
            wait()

        def wait() -> None:
            if window.busy:
                root.after(50, wait)
                return
            if args.screenshot:
                screenshot(root, args.screenshot)
            print(window.reply)
            root.destroy()

        root.after(100, run_script)
    root.mainloop()
    return 0


if __name__ == "__main__":
    sys.exit(main())

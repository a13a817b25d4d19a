"""The samples run as documented: the terminal chat, and the desktop chat under a virtual display."""
import os
import re
import select
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

SAMPLES = Path(__file__).resolve().parent.parent / "samples"


def test_terminal_chat_streams_replies_and_keeps_the_conversation(tiny_llama):
    """Each reply is the model's answer to the whole conversation so far, and /reset starts a new one:
    the sample's replies must equal the API's for the same message lists."""
    from dflash_edge.runtime.api import DFlashModel

    first, second = "the cat sat", "hello world"
    run = subprocess.run([sys.executable, str(SAMPLES / "chat_cli.py"), str(tiny_llama[2]), "--max-new-tokens", "12"],
                         input=f"{first}\n{second}\n/reset\n{second}\n", capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr

    model = DFlashModel(tiny_llama[2])
    system = {"role": "system", "content": "You are a helpful assistant."}  # the sample's default --system

    def reply(*turns):
        messages = [system] + [{"role": role, "content": text}
                               for role, text in zip(["user", "assistant"] * len(turns), turns)]
        return model.generate(messages, 12)

    one = reply(first)
    kept = reply(first, one.text, second)  # the second turn sees the first
    fresh = reply(second)  # what the same message gets in a new conversation, as after /reset
    assert kept.text != fresh.text, "the history changes nothing here: pick other messages"
    # The whole transcript: a prompt, the streamed reply, its stats line, for each message; /reset prints
    # nothing but the next prompt.
    stats = r"\n\[{} tokens, [\d.]+ tok/s, tau [\d.]+, (?:stop|length)\]\n"
    expected = "".join(re.escape(f"> {r.text}") + stats.format(len(r.token_ids))
                       for r in (one, kept)) + "> " + re.escape(f"> {fresh.text}") + stats.format(
        len(fresh.token_ids)) + "> \n"
    assert re.fullmatch(expected, run.stdout), run.stdout


def _free_display_server():
    """Start Xvfb on a display number it picks itself (-displayfd), and wait until it takes connections.

    Xvfb writes the number to the pipe only once it listens, and picks one no other server holds, so
    concurrent test runs cannot collide; a fixed wait or a number derived from the pid could do both."""
    read_end, write_end = os.pipe()
    log = tempfile.TemporaryFile()  # not a pipe: a server that talks a lot must never block on it
    server = subprocess.Popen(["Xvfb", "-displayfd", str(write_end), "-screen", "0", "1024x768x24", "-nolisten", "tcp"],
                              stdout=subprocess.DEVNULL, stderr=log, pass_fds=(write_end,))
    os.close(write_end)
    number = b""
    deadline = time.monotonic() + 30
    try:
        while not number.endswith(b"\n"):
            left = deadline - time.monotonic()
            ready, _, _ = select.select([read_end], [], [], max(left, 0))
            if not ready:
                raise TimeoutError("Xvfb did not report its display within 30 s")
            chunk = os.read(read_end, 16)
            if not chunk:  # the pipe closed: Xvfb exited before it listened
                server.wait(10)
                log.seek(0)
                raise RuntimeError(f"Xvfb did not start: {log.read().decode(errors='replace')[-300:]}")
            number += chunk
    except BaseException:
        server.kill()
        server.wait(10)
        raise
    finally:
        os.close(read_end)
    display = f":{int(number)}"
    wait_for_display(display, server, deadline)
    return server, display


def wait_for_display(display: str, server, deadline: float) -> None:
    """Poll the display's socket until a client can connect (belt and braces after -displayfd)."""
    path = f"/tmp/.X11-unix/X{display[1:]}"
    while True:
        assert server.poll() is None, "Xvfb exited"
        with socket.socket(socket.AF_UNIX) as probe:
            try:
                probe.connect(path)
                return
            except OSError:
                pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"Xvfb's display {display} took no connection within 30 s")
        time.sleep(0.05)


@pytest.fixture
def display():
    if not shutil.which("Xvfb"):
        pytest.skip("Xvfb is not installed, so there is no display for the desktop sample: `make install` "
                    "installs it with apt-get only as root (its note says when it could not), or run "
                    "`apt-get install xvfb`")
    server, number = _free_display_server()
    yield number
    server.terminate()
    server.wait(10)


def test_desktop_chat_replies_in_its_window(tiny_llama, display, tmp_path):
    from PIL import Image

    from dflash_edge.runtime.api import DFlashModel

    shot = tmp_path / "window.png"
    run = subprocess.run([sys.executable, str(SAMPLES / "desktop_chat.py"), str(tiny_llama[2]), "--max-new-tokens",
                          "20", "--script", "the cat sat", "--screenshot", str(shot)],
                         capture_output=True, text=True, timeout=120, env={**os.environ, "DISPLAY": display})
    assert run.returncode == 0, run.stderr
    expected = DFlashModel(tiny_llama[2]).generate([{"role": "user", "content": "the cat sat"}], 20).text
    assert run.stdout.rstrip("\n") == expected
    image = Image.open(shot).convert("L")
    assert image.size[0] > 200 and image.size[1] > 200
    low, high = image.getextrema()
    assert high - low > 100  # text on a background, not a blank frame

"""The samples run as documented: the terminal chat, and the desktop chat under a virtual display."""
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

SAMPLES = Path(__file__).resolve().parent.parent / "samples"


def test_terminal_chat_streams_replies_and_keeps_the_conversation(tiny_llama):
    run = subprocess.run([sys.executable, str(SAMPLES / "chat_cli.py"), str(tiny_llama[2]), "--max-new-tokens", "12"],
                         input="the cat sat\n/reset\nhello world\n", capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout.count(" tokens, ") == 2 and "tau" in run.stdout


@pytest.fixture
def display():
    if not shutil.which("Xvfb"):
        pytest.skip("Xvfb is not installed (make install installs it where apt-get can)")
    number = 90 + os.getpid() % 9
    server = subprocess.Popen(["Xvfb", f":{number}", "-screen", "0", "1024x768x24", "-nolisten", "tcp"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(1.0)
    assert server.poll() is None, "Xvfb did not start"
    yield f":{number}"
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

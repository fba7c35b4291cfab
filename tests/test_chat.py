"""`edgesmith chat` on a tiny model: one-shot and interactive (history, /reset, EOF)."""
import subprocess
import sys


def test_chat_prompt_and_interactive(tiny_llama):
    r = subprocess.run([sys.executable, "-m", "edgesmith", "chat", str(tiny_llama), "--prompt", "hi", "--max-new-tokens", "5"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "finish reason 'length'" in r.stderr  # a random model never says <|im_end|> in 5 tokens
    r = subprocess.run([sys.executable, "-m", "edgesmith", "chat", str(tiny_llama), "--max-new-tokens", "3"],
                       input="hello\n/reset\nagain\n", capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("> ") >= 3  # a prompt per input line plus the final one before EOF


def test_chat_gguf_rejects_garbage(tmp_path):
    f = tmp_path / "x.gguf"
    f.write_bytes(b"GGUF" + b"\x00" * 20)
    r = subprocess.run([sys.executable, "-m", "edgesmith", "chat", str(f), "--prompt", "hi"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "not a readable GGUF" in r.stderr and "Traceback" not in r.stderr

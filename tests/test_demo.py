"""The document-QA demo: --file for .txt, .md, .html and .pdf, clear one-line errors, the
quick mode end to end on the embedded model, and --server against a running service."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import tiny_lm
from typer.testing import CliRunner

from memlm.cli import app
from memlm.demo import QUICK_FACTS, RemoteReader, read_document, run_demo
from memlm.serve.model_server import ModelServerConfig, serve

REPO = Path(__file__).resolve().parent.parent
FACT = "The pass key is 48213. Remember it."


def minimal_pdf(lines: list[str]) -> bytes:
    """A one-page PDF that writes `lines` in Helvetica (a standard font: no font file needed),
    with the cross-reference offsets a reader checks."""

    def escape(text: str) -> str:
        return text.replace("\\", "\\\\").replace("(", "\\(").replace(")", "\\)")

    content = "BT /F1 12 Tf 72 720 Td 14 TL " + " ".join(f"({escape(line)}) Tj T*" for line in lines) + " ET"
    objects = [
        "<< /Type /Catalog /Pages 2 0 R >>",
        "<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
        "<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Resources << /Font << /F1 4 0 R >> >> "
        "/Contents 5 0 R >>",
        "<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>",
        f"<< /Length {len(content)} >>\nstream\n{content}\nendstream",
    ]
    pdf = b"%PDF-1.4\n"
    offsets = []
    for number, body in enumerate(objects, 1):
        offsets.append(len(pdf))
        pdf += f"{number} 0 obj\n{body}\nendobj\n".encode()
    xref = len(pdf)
    pdf += f"xref\n0 {len(objects) + 1}\n0000000000 65535 f \n".encode()
    pdf += "".join(f"{offset:010d} 00000 n \n" for offset in offsets).encode()
    pdf += f"trailer\n<< /Size {len(objects) + 1} /Root 1 0 R >>\nstartxref\n{xref}\n%%EOF\n".encode()
    return pdf


@pytest.fixture
def documents(tmp_path) -> dict[str, Path]:
    """The same fact as plain text, Markdown, HTML (with a script and a style that must not
    be read) and PDF."""
    files = {
        "txt": FACT + "\nThe sky is blue.\n",
        "md": f"# Notes\n\n- {FACT}\n- The sky is *blue*.\n",
        "html": f"<html><head><style>p {{color: red}}</style><script>var secret = 1;</script></head>"
                f"<body><h1>Notes</h1><p>{FACT}</p><p>The sky is blue.</p></body></html>",
    }  # fmt: skip
    paths = {}
    for suffix, text in files.items():
        paths[suffix] = tmp_path / f"notes.{suffix}"
        paths[suffix].write_text(text, encoding="utf-8")
    paths["pdf"] = tmp_path / "notes.pdf"
    paths["pdf"].write_bytes(minimal_pdf([FACT, "The sky is blue."]))
    return paths


@pytest.mark.parametrize("suffix", ["txt", "md", "html", "pdf"])
def test_every_format_reads_to_its_text(documents, suffix: str) -> None:
    text = read_document(documents[suffix])
    assert "The pass key is 48213." in " ".join(text.split())
    assert "secret" not in text and "color" not in text and "<p>" not in text


def test_bad_files_get_a_clear_one_line_error(tmp_path) -> None:
    (tmp_path / "latin1.txt").write_bytes("caf\xe9 cr\xe8me".encode("latin-1"))
    (tmp_path / "broken.pdf").write_bytes(b"%PDF-1.4\nnot really a pdf")
    (tmp_path / "blank.pdf").write_bytes(minimal_pdf([]))
    (tmp_path / "empty.md").write_text("  \n")
    cases = {
        tmp_path / "missing.txt": "no such file",
        tmp_path: "is not a file",
        tmp_path / "latin1.txt": "is not UTF-8 text",
        tmp_path / "broken.pdf": "cannot read .* as PDF",
        tmp_path / "blank.pdf": "holds no text .*scanned PDF",
        tmp_path / "empty.md": "holds no text",
    }
    for path, message in cases.items():
        with pytest.raises(ValueError, match=message) as error:
            read_document(path)
        assert "\n" not in str(error.value)


def test_the_script_exits_1_with_one_line_on_a_bad_file(tmp_path) -> None:
    """What `make demo ARGS="--file ..."` prints for a missing or unreadable file: one line,
    exit status 1, before any model is loaded. The script once as a process, the other
    cases through the same CLI command in this process (a process start costs seconds)."""
    script = [sys.executable, str(REPO / "scripts" / "docqa_demo.py")]
    done = subprocess.run([*script, "--file", str(tmp_path / "nope.txt"), "--question", "What is the pass key?"],
                          capture_output=True, text=True, env=dict(os.environ), timeout=300)  # fmt: skip
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines() == [f"error: no such file: {tmp_path / 'nope.txt'}"]
    (tmp_path / "broken.pdf").write_bytes(b"%PDF-1.4\nnot really a pdf")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    cases = {tmp_path / "broken.pdf": "as PDF", tmp_path / "latin1.txt": "not UTF-8", tmp_path: "not a file"}
    for path, message in cases.items():
        result = CliRunner().invoke(app, ["demo", "--file", str(path)])
        assert result.exit_code == 1
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], result.stderr


@pytest.mark.slow
def test_quick_demo_end_to_end(embedded_lm, capsys) -> None:
    """--quick: a 2,000-token handbook with 4 facts at 5%..85%, on the embedded model.

    Thresholds, from runs of this test's setting (float32, greedy, 24 new tokens) on the
    project's machine: seed 0 answers 1 of 4 right (seeds 1 and 2: 1/4 and 0/4; a 1,200-token
    handbook also 1/4). The misses are the 135M model's: it names a made-up lead or city even
    when the block holding the fact is among those it read. So the demo must answer >= 1/4
    (with 4 questions the only bar below the measured one is 0, which tests nothing), and
    its "read tokens" lines must show the fact's block for >= 1 question (measured: 2 of 4)."""
    accuracy = run_demo(quick=True, lm=embedded_lm, max_new_tokens=24, seed=0)
    out = capsys.readouterr().out
    assert accuracy is not None and accuracy >= 0.25, out
    questions = out.split("Q: ")[1:]
    assert len(questions) == QUICK_FACTS and "Summary:" in out and "built-in questions right:" in out
    found = 0
    for block in questions:
        expected = block.split("expected: ")[1].split("  [")[0]
        read = [line for line in block.splitlines() if line.strip().startswith("read #")]
        assert read, block  # every answer shows where in the document the memory it read came from
        found += any(expected in line for line in read)
    assert found >= 1, out
    assert embedded_lm.memories() == []  # the demo cleans up after itself


@pytest.mark.slow
def test_file_demo_end_to_end_on_a_pdf(documents, embedded_lm, capsys) -> None:
    """--file with a PDF and the user's own question: the PDF's text ingested, the question
    answered (what the 135M model says to a one-line document is not the point), a summary."""
    accuracy = run_demo(file=documents["pdf"], questions=["What is the pass key?"], lm=embedded_lm, max_new_tokens=16)
    out = capsys.readouterr().out
    tokens = len(embedded_lm.tokenizer(read_document(documents["pdf"]), add_special_tokens=False)["input_ids"])
    assert accuracy is None  # a user's file has no known answers
    assert "Q: What is the pass key?\nA: " in out and f"Summary: {tokens} tokens ingested" in out
    assert embedded_lm.memories() == []


def test_demo_against_a_running_server(documents, capsys, monkeypatch) -> None:
    """--server: the file goes to `memlm serve` in pieces (a progress bar), the answers
    stream back, and the demo's memory is deleted at the end. A tiny random model serves."""
    engine = tiny_lm(segment_len=32, sink_len=4, local_len=16, block_len=4, top_k=2, query_chunk=8)
    server = serve(ModelServerConfig(port=0, host="127.0.0.1"), engine=engine)
    try:
        long_file = documents["txt"].with_name("long.txt")
        long_file.write_text((FACT + " The sky is blue. ") * 40)
        monkeypatch.setattr(RemoteReader, "CHUNK_CHARS", 500)  # several Ingest calls: the appending path
        accuracy = run_demo(file=long_file, questions=["What is the pass key?"], server=f"127.0.0.1:{server.port}",
                            max_new_tokens=4)  # fmt: skip
    finally:
        server.stop(0)
    out = capsys.readouterr().out
    assert accuracy is None and "Q: What is the pass key?" in out and "Summary:" in out
    assert f"{len(long_file.read_text())} tokens ingested" in out  # the tiny tokenizer: one token a byte
    assert engine.memories() == []

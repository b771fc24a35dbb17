"""Issue #14 item 5: shards opened through webdataset's URL opener: ``pipe:`` commands and http URLs train, evaluate
and verify; eval's per-shard counts come from the sizes.json served beside the shards."""
import functools
import http.server
import json
import threading
from collections import Counter

import pytest

from ett_ds.data.decode import iter_tar_samples
from ett_ds.data.eval_stream import shard_counts
from ett_ds.data.shards import expand_urls
from ett_ds.evaluate import main as evaluate
from ett_ds.train import main as train
from tests.tiny import build_demo, demo_train_args


class _Quiet(http.server.SimpleHTTPRequestHandler):
    requests: list = []

    def log_message(self, *args):  # keep pytest output clean; remember what was asked for
        _Quiet.requests.append(self.path)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return build_demo(tmp_path_factory.mktemp("demo"), 64, 12, 32)


@pytest.fixture(scope="module")
def server(demo):
    handler = functools.partial(_Quiet, directory=str(demo))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)  # port 0: a free port
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def _names(folder):
    return sorted(p.name for p in folder.glob("*.tar"))


def test_pipe_http_and_local_read_the_same_samples(demo, server):
    local = str(demo / "heldout" / _names(demo / "heldout")[0])
    keys = {}
    for url in (local, f"pipe:cat {local}", f"{server}/heldout/{_names(demo / 'heldout')[0]}"):
        stats = Counter()
        keys[url] = [(s["__key__"], s["png"] if "png" in s else s.get("jpg")) for s in iter_tar_samples(url, stats)]
        assert stats == Counter(), (url, stats)
    a, b, c = keys.values()
    assert a and a == b == c
    # a failing command or a missing URL is one counted shard failure, not an exception
    for bad in ("pipe:cat /nonexistent/x.tar", f"{server}/heldout/missing.tar"):
        stats = Counter()
        assert list(iter_tar_samples(bad, stats)) == [] and stats["unreadable_shard"] == 1, bad
    # a truncated stream is detected without a file size to compare with
    stats = Counter()
    n = len(list(iter_tar_samples(f"pipe:head -c 3000 {local}", stats)))
    assert stats["truncated_tar"] == 1 and n < len(a)


def test_eval_counts_come_from_sizes_json_beside_http_shards(demo, server):
    names = _names(demo / "train")  # a folder no other test has asked the server for yet
    urls = expand_urls(f"{server}/train/{{{','.join(names)}}}")
    assert len(urls) == len(names) > 1
    counts = shard_counts(urls)
    sizes = json.loads((demo / "train" / "sizes.json").read_text())
    assert counts == [sizes[n] for n in names]
    asked = [r for r in _Quiet.requests if r.startswith("/train/")]
    assert asked == ["/train/sizes.json"]  # fetched once, and no shard was downloaded to count it


def test_pipe_and_http_train_and_evaluate(demo, server, tmp_path):
    train_names = _names(demo / "train")
    pipe_train = "::".join(f"pipe:cat {demo}/train/{n}" for n in train_names)
    http_eval = f"{server}/heldout/{{{','.join(_names(demo / 'heldout'))}}}"
    args = demo_train_args(demo, tmp_path, "name=p", "stage=ett", "train.max_steps=2", "train.image_every=0",
                           f"data.train={pipe_train}", f"data.eval={http_eval}")
    assert train(args) == 0
    ckpt = tmp_path / "p" / "checkpoints" / "step_00000002"
    assert ckpt.is_dir()
    http_train = f"{server}/train/{{{','.join(train_names)}}}"
    assert train(demo_train_args(demo, tmp_path, "name=h", "stage=tokenizer", "train.max_steps=1",
                                 "train.image_every=0", f"data.train={http_train}")) == 0
    out = tmp_path / "m.json"
    assert evaluate(["--ckpt", str(ckpt), "--data", http_eval, "--tasks", "recon,caption", "--out", str(out),
                     "--batch-size", "5", "--ocr", "off", "--quiet"]) == 0
    m = json.loads(out.read_text())
    assert m["num_samples"] == 12
    out2 = tmp_path / "m2.json"
    pipe_eval = "::".join(f"pipe:cat {demo}/heldout/{n}" for n in _names(demo / "heldout"))
    assert evaluate(["--ckpt", str(ckpt), "--data", pipe_eval, "--tasks", "recon", "--out", str(out2),
                     "--batch-size", "5", "--ocr", "off", "--quiet"]) == 0
    assert json.loads(out2.read_text())["num_samples"] == 12


def test_verify_reads_urls(demo, server, capsys):
    from data_tools.cli import main as data_tools
    names = _names(demo / "heldout")
    capsys.readouterr()
    # an http folder: its shards are the ones sizes.json lists
    assert data_tools(["verify", "--json", f"{server}/heldout/"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["shards"] == len(names) and report["samples"] == 12 and report["problems"] == []
    # pipe: shards (no sizes.json to compare with: counted, not checked)
    assert data_tools(["verify", "--json", "::".join(f"pipe:cat {demo}/heldout/{n}" for n in names)]) == 0
    assert json.loads(capsys.readouterr().out)["samples"] == 12
    # a broken stream is a problem
    assert data_tools(["verify", f"pipe:head -c 3000 {demo}/heldout/{names[0]}"]) == 1

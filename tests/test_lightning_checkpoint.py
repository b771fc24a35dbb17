"""A real PyTorch-Lightning checkpoint starts the tokenizer, and no checkpoint runs code while its tensors are read.

SEED-Voken releases IBQ as Lightning ``.ckpt`` files: the weights in ``state_dict`` (taming layout, ``loss.*``,
``model_ema.*``) beside omegaconf ``hyper_parameters``, callback, loop and optimizer states. Here the real
pytorch-lightning and omegaconf packages (test-only dependencies, requirements-test.txt) write such a file from a
tiny IBQ; ``model.tokenizer.checkpoint=`` must load its weights exactly and train from them. Files whose pickles
call ``os.system``, ``eval``, ``exec``, ``subprocess``, ``getattr`` chains or non-rebuild torch functions must load
their tensors (or be refused in one line) without the command ever running; each probe is shown to be live by a
plain ``torch.load(weights_only=False)`` at the end.
"""
import builtins
import os
import subprocess
import zipfile

import pytest
import torch

from ett_ds.checkpoint import CheckpointError
from ett_ds.checkpoint.inert_unpickle import NotLoaded
from ett_ds.models.weights import full_state_dict
from ett_ds.tokenizers.checkpoint import (
    load_tokenizer_weights,
    read_checkpoint,
    read_state_dict,
    tokenizer_config_from_checkpoint,
)
from ett_ds.tokenizers.ibq import IBQTokenizer
from tests.stage_batches import pixel_batch
from tests.tiny import repeat, tiny_config, train_spm

TEST_DEP = "test-only dependency: pip install -r requirements-test.txt"


def seed_voken_ddconfig(tok_cfg) -> dict:
    return {"double_z": False, "z_channels": tok_cfg.z_channels, "resolution": tok_cfg.resolution,
            "in_channels": tok_cfg.in_channels, "out_ch": tok_cfg.in_channels, "ch": tok_cfg.ch,
            "ch_mult": list(tok_cfg.ch_mult), "num_res_blocks": tok_cfg.num_res_blocks,
            "attn_resolutions": list(tok_cfg.attn_resolutions), "dropout": tok_cfg.dropout}


def lit_ibq_class():
    """The LightningModule class (defined on demand: pytorch_lightning is imported only when this test runs)."""
    pl = pytest.importorskip("pytorch_lightning", reason=TEST_DEP)

    class LitIBQ(pl.LightningModule):
        """SEED-Voken's IBQ as Lightning saves it: tokenizer modules at the top level, a discriminator under ``loss``,
        a LitEma-style ``model_ema`` (buffers named without dots, plus decay/num_updates); architecture in omegaconf
        hyper_parameters."""

        def __init__(self, ddconfig, lossconfig, n_embed, embed_dim, tok_cfg=None):
            super().__init__()
            self.save_hyperparameters(ignore=["tok_cfg"])
            tok = IBQTokenizer(tok_cfg)
            for name, child in tok.named_children():
                self.add_module(name, child)
            self.tok_keys = list(tok.state_dict())
            self.loss = torch.nn.Module()
            self.loss.discriminator = torch.nn.Conv2d(3, 4, 3)
            self.model_ema = torch.nn.Module()
            for k, v in self.tokenizer_state().items():
                self.model_ema.register_buffer(k.replace(".", ""), v.detach().clone())
            self.model_ema.register_buffer("decay", torch.tensor(0.9))
            self.model_ema.register_buffer("num_updates", torch.tensor(0, dtype=torch.int))

        def tokenizer_state(self) -> dict:
            own = self.state_dict()
            return {k: own[k] for k in self.tok_keys}

        def training_step(self, batch, _):
            x = batch[0]
            rec = self.decoder(self.post_quant_conv(self.quant_conv(self.encoder(x))))
            return torch.nn.functional.mse_loss(rec, x) + 1e-3 * self.quantize.embedding.weight.square().mean() + \
                1e-3 * self.loss.discriminator(x).square().mean()

        def on_train_batch_end(self, *_):
            with torch.no_grad():
                for k, v in self.tokenizer_state().items():
                    getattr(self.model_ema, k.replace(".", "")).lerp_(v, 0.1)
                self.model_ema.num_updates += 1

        def configure_optimizers(self):
            return torch.optim.Adam(self.parameters(), lr=1e-3)

    return LitIBQ


@pytest.fixture(scope="module")
def tiny_ibq(tmp_path_factory):
    """(spm model, the tiny recipe's tokenizer config) for stage=tokenizer."""
    root = tmp_path_factory.mktemp("tiny_ibq")
    spm = train_spm(root / "spm")
    return spm, tiny_config(spm, root, "stage=tokenizer").model.tokenizer


@pytest.fixture(scope="module")
def lightning_ckpt(tiny_ibq, tmp_path_factory):
    """(spm model, .ckpt path, tokenizer config, raw weights, EMA weights) of a tiny IBQ trained one Lightning step."""
    lit_ibq = lit_ibq_class()
    pl = pytest.importorskip("pytorch_lightning", reason=TEST_DEP)
    omegaconf = pytest.importorskip("omegaconf", reason=TEST_DEP)
    root = tmp_path_factory.mktemp("lightning")
    spm, tok_cfg = tiny_ibq
    torch.manual_seed(0)
    hp = omegaconf.OmegaConf.create({"ddconfig": seed_voken_ddconfig(tok_cfg), "lossconfig": {
        "target": "src.IBQ.modules.losses.vqperceptual.VQLPIPSWithDiscriminator", "params": {"disc_start": 0}}})
    module = lit_ibq(hp.ddconfig, hp.lossconfig, tok_cfg.codebook_size, tok_cfg.code_dim, tok_cfg=tok_cfg)
    h, w = 16, 32
    images = torch.utils.data.TensorDataset(torch.rand(4, 3, h, w) * 2 - 1)
    trainer = pl.Trainer(max_steps=1, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=str(root / "pl"))
    trainer.fit(module, torch.utils.data.DataLoader(images, batch_size=2))
    path = root / "ibq.ckpt"
    trainer.save_checkpoint(str(path))
    raw = {k: v.detach().clone() for k, v in module.tokenizer_state().items()}
    ema = {k: getattr(module.model_ema, k.replace(".", "")).detach().clone() for k in raw}
    assert not all(torch.equal(raw[k], ema[k]) for k in raw)  # the two copies differ, so the test can tell them apart
    return spm, path, tok_cfg, raw, ema


def test_the_real_lightning_file_pickles_objects_weights_only_refuses(lightning_ckpt):
    _, path, tok_cfg, _, _ = lightning_ckpt
    with pytest.raises(Exception, match="(?i)weights only load failed"):
        torch.load(path, weights_only=True)
    data, not_loaded = read_checkpoint(path)
    assert "omegaconf.dictconfig.DictConfig" in not_loaded
    assert {"state_dict", "optimizer_states", "callbacks", "loops", "hyper_parameters"} <= set(data)
    hp = data["hyper_parameters"]  # omegaconf content recovered as plain data
    assert hp["ddconfig"] == seed_voken_ddconfig(tok_cfg) and hp["n_embed"] == tok_cfg.codebook_size
    assert hp["lossconfig"]["params"] == {"disc_start": 0}
    assert isinstance(data["optimizer_states"][0]["state"][0]["exp_avg"], torch.Tensor)
    back = tokenizer_config_from_checkpoint(path)
    assert (back.ch, back.ch_mult, back.attn_resolutions, back.codebook_size, back.code_dim) == \
        (tok_cfg.ch, tok_cfg.ch_mult, tok_cfg.attn_resolutions, tok_cfg.codebook_size, tok_cfg.code_dim)


@pytest.mark.parametrize("use_ema", [True, False])
def test_the_lightning_checkpoint_loads_exactly(lightning_ckpt, use_ema):
    _, path, tok_cfg, raw, ema = lightning_ckpt
    tok = IBQTokenizer(tok_cfg)
    report = load_tokenizer_weights(tok, path, use_ema=use_ema)
    want = ema if use_ema else raw
    assert report["tensors"] == len(want) and set(tok.state_dict()) == set(want)
    assert all(torch.equal(tok.state_dict()[k], want[k]) for k in want)


def test_the_tokenizer_stage_trains_from_the_lightning_checkpoint(lightning_ckpt, tmp_path):
    """model.tokenizer.checkpoint=<the .ckpt>: the Trainer starts from its EMA weights and takes two steps."""
    from ett_ds.engine import dist
    from ett_ds.trainer import Trainer
    dist.init_distributed()
    spm, path, _, _, ema = lightning_ckpt
    tr = Trainer(tiny_config(spm, tmp_path, "stage=tokenizer", "engine.precision=fp32",
                             f"model.tokenizer.checkpoint={path}"))
    start = full_state_dict(tr.model.tokenizer)
    assert set(start) == set(ema) and all(torch.equal(start[k], ema[k]) for k in ema)
    batches = repeat(pixel_batch(tr))
    for _ in range(2):
        tr.train_step(batches)
    after = full_state_dict(tr.model.tokenizer)
    assert all(torch.isfinite(v).all() for v in after.values())
    assert not torch.equal(after["decoder.conv_out.weight"], ema["decoder.conv_out.weight"])


# ---- payloads: objects whose unpickling runs a command (here: creates a marker file) ----

class Reduces:
    """Pickles as ``func(*args)``; unpickling with weights_only=False calls it."""

    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args

    def __call__(self):  # pickle wants reduce callables to be callable; never called here
        raise AssertionError


def payloads(marker) -> dict:
    touch = f"touch {marker}"
    import_os = Reduces(builtins.__import__, "os")
    return {
        "os.system": Reduces(os.system, touch),
        "eval": Reduces(builtins.eval, f"__import__('os').system({touch!r})"),
        "exec": Reduces(builtins.exec, f"import os; os.system({touch!r})"),
        "getattr chain": Reduces(Reduces(builtins.getattr, import_os, "system"), touch),
        "subprocess": Reduces(subprocess.call, ["touch", str(marker)]),
        "torch.save": Reduces(torch.save, {}, str(marker)),  # a torch function, but no tensor rebuild
        "rebuild_from_type_v2": Reduces(torch._tensor._rebuild_from_type_v2, os.system, torch.Tensor, (touch,), {}),
    }


PAYLOADS = list(payloads("x"))


def poisoned(tmp_path, name, weights, protocol=2):
    """A Lightning-like checkpoint: the weights plus the payload (in hyper_parameters), and the marker path."""
    marker = tmp_path / f"code_ran_{name.replace(' ', '_')}"
    path = tmp_path / "evil.ckpt"
    payload = payloads(marker)[name]
    torch.save({"state_dict": {**weights, "loss.payload": payload}, "hyper_parameters": {"cfg": payload},
                "global_step": 1}, path, pickle_protocol=protocol)
    return path, marker


def assert_probe_is_live(path, marker):
    """The payload really runs under a plain load (so its absence above means something)."""
    try:
        torch.load(path, weights_only=False)
    except Exception:  # some payloads break the plain load after running
        pass
    assert marker.exists(), "the probe did not run under weights_only=False"


@pytest.mark.parametrize("protocol", [2, 4])
@pytest.mark.parametrize("name", PAYLOADS)
def test_a_payload_loads_the_tensors_and_runs_nothing(tiny_ibq, tmp_path, name, protocol):
    tok_cfg = tiny_ibq[1]
    torch.manual_seed(2)
    raw = {k: torch.randn_like(v) for k, v in IBQTokenizer(tok_cfg).state_dict().items()}
    path, marker = poisoned(tmp_path, name, raw, protocol)
    tok = IBQTokenizer(tok_cfg)
    try:
        load_tokenizer_weights(tok, path, use_ema=False)
    except CheckpointError as e:  # refusing is allowed, as one line that never advises weights_only=False
        assert len(str(e).splitlines()) == 1 and "weights_only" not in str(e) and "nothing" in str(e), str(e)
        assert name == "rebuild_from_type_v2", str(e)  # ... only where the payload sits inside a tensor rebuild
    else:
        assert all(torch.equal(tok.state_dict()[k], raw[k]) for k in raw)
        data, not_loaded = read_checkpoint(path)
        assert isinstance(data["hyper_parameters"]["cfg"], NotLoaded) and not_loaded
    assert not marker.exists(), "the checkpoint ran code"
    assert_probe_is_live(path, marker)


def test_a_global_is_never_imported(tmp_path, monkeypatch):
    """A module whose import runs a command (named by a pickled function) is never imported by the loader."""
    import sys
    marker = tmp_path / "imported"
    (tmp_path / "runs_on_import.py").write_text(f"import pathlib\npathlib.Path({str(marker)!r}).touch()\n"
                                                "def f():\n    pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    import runs_on_import
    path = tmp_path / "ref.ckpt"
    torch.save({"state_dict": {"w": torch.ones(2)}, "fn": runs_on_import.f}, path)
    del sys.modules["runs_on_import"]
    marker.unlink()
    assert torch.equal(read_state_dict(path)["w"], torch.ones(2))
    assert "runs_on_import" not in sys.modules and not marker.exists()
    assert_probe_is_live(path, marker)
    del sys.modules["runs_on_import"]


def rewritten(tmp_path, name, data_pkl: bytes | None = None, extra: dict | None = None):
    """A torch.save zip archive (one tensor) with its data.pkl replaced and/or records added."""
    torch.save({"w": torch.ones(2)}, tmp_path / "base.pt")
    path = tmp_path / name
    with zipfile.ZipFile(tmp_path / "base.pt") as src, zipfile.ZipFile(path, "w") as dst:
        for n in src.namelist():
            dst.writestr(n, data_pkl if data_pkl is not None and n.endswith("data.pkl") else src.read(n))
        for n, data in (extra or {}).items():
            dst.writestr(f"{src.namelist()[0].split('/')[0]}/{n}", data)
    return path


def test_a_payload_without_tensors_is_one_line_and_runs_nothing(tmp_path):
    """A hand-written protocol-0 pickle (INST opcode: ``os.system`` built as a class) inside a torch zip archive."""
    marker = tmp_path / "code_ran"
    path = rewritten(tmp_path, "inst.ckpt", f"(S'touch {marker}'\nios\nsystem\n.".encode())
    with pytest.raises(CheckpointError) as e:
        read_state_dict(path)
    msg = str(e.value)
    assert len(msg.splitlines()) == 1 and "no tensors" in msg and "os.system" in msg and "weights_only" not in msg
    assert not marker.exists()
    assert_probe_is_live(path, marker)


def test_torchscript_archives_are_refused_not_dispatched_to_jit(tmp_path):
    """torch.load(weights_only=False) hands an archive with constants.pkl to torch.jit.load; ours refuses it."""
    path = rewritten(tmp_path, "scripted.ckpt", extra={"constants.pkl": b"\x80\x02).", "code/__torch__.py": b""})
    with pytest.raises(CheckpointError, match="TorchScript") as e:
        read_state_dict(path)
    assert len(str(e.value).splitlines()) == 1 and "weights_only" not in str(e.value)

"""Run under torchrun with 2 ranks: trains 2 ETT steps on shards and reports, per rank, what the decoder saw.

Writes ``result_rank{N}.json`` per rank into the run folder (ranks share stdout, so printed lines can interleave). Used by tests/test_train_loop.py.
"""
import json
import math
import sys

from ett_ds.config import load_config
from ett_ds.engine import dist
from ett_ds.trainer import Trainer


def main(overrides):
    cfg = load_config("tiny", overrides)
    dist.init_distributed()
    tr = Trainer(cfg)
    seen = {}
    conv = tr.model.tokenizer.decoder.conv_out

    def hook(mod, inputs, output):
        w = mod.weight.detach()
        seen["w_dtype"], seen["out_dtype"] = str(w.dtype), str(output.dtype)
        seen["not_rounded"] = bool((w.float() != w.bfloat16().float()).any())

    def llm_hook(mod, inputs, output):
        seen["llm"] = str(output.dtype)

    conv.register_forward_hook(hook)
    tr.model.llm.model.layers[0].mlp.down_proj.register_forward_hook(llm_hook)
    it = iter(tr.batches())
    finite = True
    for _ in range(2):
        tr.train_step(it)
        finite &= all(math.isfinite(float(v)) for v in tr.log.sums.values())
    result = {"rank": dist.rank(), "world_size": dist.world_size(),
              "decoder_weight_dtype": seen["w_dtype"], "decoder_out_dtype": seen["out_dtype"],
              "decoder_weight_not_bf16_rounded": seen["not_rounded"], "llm_out_dtype": seen["llm"],
              "losses_finite": finite}
    tr.run_dir.mkdir(parents=True, exist_ok=True)
    (tr.run_dir / f"result_rank{dist.rank()}.json").write_text(json.dumps(result))
    dist.barrier()


if __name__ == "__main__":
    main(sys.argv[1:])

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from qvera import ModelConfig, load_base
from qvera.generation.decode import Sampling, chat_prompt, decode_steps
from qvera.generation.last_logits import fold_last_position


class OpNames(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.names: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(func.__name__)
        return func(*args, **kwargs or {})


def head_ops(head, hidden) -> tuple[torch.Tensor, list[str]]:
    with torch.no_grad(), OpNames() as ops:
        out = head(hidden)
    return out, ops.names


def test_the_output_layer_takes_a_sliced_last_position_as_one_product(tiny_llama_dir):
    """logits_to_keep=1 hands the head (rows, 1, hidden) with the sequence's stride: a batched
    product over a copy of the weight per row, unless the slice is copied first."""
    model, tokenizer = load_base(ModelConfig(name=tiny_llama_dir, quantization="fp32"))
    hidden = torch.randn(4, 9, model.config.hidden_size)[:, -1:, :]
    before, ops = head_ops(model.lm_head, hidden)
    assert "bmm.default" in ops
    fold_last_position(model)
    fold_last_position(model)  # once per model
    after, ops = head_ops(model.lm_head, hidden)
    assert "bmm.default" not in ops and "mm.default" in ops
    assert len(model.lm_head._forward_pre_hooks) == 1
    torch.testing.assert_close(after, before)
    prompts = [chat_prompt(tokenizer, [{"role": "user", "content": text}]) for text in ("Hi", "Name three rivers.")]
    with OpNames() as ops:
        next(decode_steps(model, prompts, [Sampling(0.0, 1.0, 1)] * 2, set(), tokenizer.pad_token_id))
    assert "bmm.default" not in ops.names  # a padded prefill of two prompts: no batched head product

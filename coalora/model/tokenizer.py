"""The built-in tokenizer: a byte-level BPE trained on the world's text with the ``tokenizers`` library.

Byte-level means every string is encodable (no unknown token) and decoding inverts encoding exactly. The
trained tokenizer is wrapped in ``transformers.PreTrainedTokenizerFast``, so ``save_pretrained`` writes an
ordinary Hugging Face tokenizer folder that ``AutoTokenizer.from_pretrained`` reads back offline: every
later stage loads it exactly like the tokenizer of Qwen2.5 or Llama-2.
"""

from __future__ import annotations

from typing import Iterable

EOS = "<|endoftext|>"
SPECIAL_TOKENS = (EOS,)


def train_tokenizer(texts: Iterable[str], vocab_size: int):
    """Train a byte-level BPE on ``texts``.

    ``<|endoftext|>`` (id 0) is the bos, eos and pad token: documents are separated by it when packed, and
    it is the prefix lm-eval uses for an empty context. The post-processor adds no special tokens, so
    ``tokenizer(text)`` gives the plain BPE ids of ``text``.

    Training is deterministic: the same texts and vocab_size give the same vocabulary and merges (the BPE
    trainer breaks count ties by pair order, not by hash order).

    Args:
        texts: the training documents.
        vocab_size: the vocabulary size including the 256 byte symbols and the special tokens; the result
            may be smaller when the text has fewer distinct merges.

    Returns:
        A ``transformers.PreTrainedTokenizerFast`` with ``model_max_length`` left unset (very large).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    texts = list(texts)
    if not texts:
        raise ValueError("train_tokenizer: no training text")
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer=trainer, length=len(texts))
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=EOS,
        eos_token=EOS,
        pad_token=EOS,
        unk_token=None,
        clean_up_tokenization_spaces=False,
    )

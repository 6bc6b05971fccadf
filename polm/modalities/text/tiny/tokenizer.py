"""The byte-level BPE tokenizer of polm-tiny, trained on its pretraining corpus."""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

VOCAB_SIZE = 512
PAD, END_OF_TEXT, SYSTEM, USER, ASSISTANT, END = (
    "<|pad|>",
    "<|endoftext|>",
    "<|system|>",
    "<|user|>",
    "<|assistant|>",
    "<|end|>",
)
SPECIAL_TOKENS = [PAD, END_OF_TEXT, SYSTEM, USER, ASSISTANT, END]

# Each message is its role token, a newline, the content and <|end|>. The newline
# after a role token never merges with the content (the pre-tokenizer splits it
# off), so a prompt rendered with add_generation_prompt is a token prefix of the
# full conversation, which is what completion masking relies on.
CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>\n"
    "{{ message['content'] }}<|end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def build_tokenizer(corpus: Iterable[str]) -> PreTrainedTokenizerFast:
    """Train the polm-tiny tokenizer.

    Any UTF-8 text encodes, since all 256 bytes are in the vocabulary; digits are
    always single tokens so that arithmetic is learned digit by digit. There is no
    BOS token: nothing is prepended implicitly, so tokenizing a prefix of a text
    gives a prefix of its tokens. Documents are separated by ``<|endoftext|>``.

    Args:
        corpus: the training texts.

    Returns:
        A fast tokenizer with ``pad_token`` ``<|pad|>``, ``eos_token`` ``<|end|>``
        and the polm chat template.
    """
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(corpus, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        pad_token=PAD,
        eos_token=END,
        unk_token=None,
        additional_special_tokens=[END_OF_TEXT, SYSTEM, USER, ASSISTANT],
        chat_template=CHAT_TEMPLATE,
        model_max_length=256,
        clean_up_tokenization_spaces=False,
    )

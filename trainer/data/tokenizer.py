"""A Hugging Face fast tokenizer: loaded from a local directory, or trained from the dataset's own text."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def train_tokenizer(
    texts: Iterable[str], vocab_size: int, out_dir: str | os.PathLike
) -> PreTrainedTokenizerFast:
    """WordPiece (BERT-style, lower-cased) trained on `texts`, saved with save_pretrained into `out_dir`.

    The same texts give the same tokenizer in every run and on every rank: ranks that find no tokenizer each train
    one at once, and each loads its own before another rank's may replace it on disk. So the pieces inside a word
    carry no "##" prefix: the trainer numbers those prefixed pieces in hash-map order, which
    differs from process to process and decides ties between merges, so that each training gave another
    vocabulary (huggingface/tokenizers#1794). A piece then has one id wherever it stands in a word; decoding puts
    spaces between pieces."""
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]", continuing_subword_prefix=""))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    trainer = trainers.WordPieceTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        show_progress=False,
        continuing_subword_prefix="",
    )
    tok.train_from_iterator(texts, trainer=trainer)
    cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B [SEP]",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)],
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="[PAD]",
        unk_token="[UNK]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
    )
    out = Path(out_dir)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.partial")  # ranks may race: each writes its own
    shutil.rmtree(tmp, ignore_errors=True)
    fast.save_pretrained(tmp)
    shutil.rmtree(out, ignore_errors=True)
    try:
        tmp.replace(out)
    except OSError:  # another rank put an identical one in place first
        shutil.rmtree(tmp, ignore_errors=True)
    return fast


def load_tokenizer(path: str | os.PathLike) -> PreTrainedTokenizerFast:
    """A fast tokenizer from a local directory (never the network)."""
    path = Path(path)
    if not (path / "tokenizer.json").is_file():
        raise FileNotFoundError(
            f"{path}: no tokenizer.json; give data.tokenizer a local fast-tokenizer directory"
        )
    tok = PreTrainedTokenizerFast.from_pretrained(str(path), local_files_only=True)
    if tok.pad_token_id is None:
        raise ValueError(f"{path}: the tokenizer has no pad token")
    return tok


def dataset_texts(dataset_dir: str | os.PathLike, fields: list[str]) -> Iterator[str]:
    """Every text field of items.parquet, then nothing else (queries come from the shards' items' vocabulary)."""
    import pyarrow.parquet as pq

    table = pq.ParquetFile(Path(dataset_dir) / "items.parquet")
    columns = [f for f in fields if f in table.schema_arrow.names]
    for batch in table.iter_batches(columns=columns, batch_size=10_000):
        for column in batch.columns:
            yield from (t for t in column.to_pylist() if t)


def resolve_tokenizer(
    configured: str, dataset_dir: str | os.PathLike, fields: list[str], vocab_size: int
) -> PreTrainedTokenizerFast:
    """data.tokenizer if set; else DIR/tokenizer; else trained from DIR/items.parquet and saved there."""
    if configured:
        return load_tokenizer(configured)
    path = Path(dataset_dir) / "tokenizer"
    if not (path / "tokenizer.json").is_file():
        train_tokenizer(dataset_texts(dataset_dir, fields), vocab_size, path)
    return load_tokenizer(path)

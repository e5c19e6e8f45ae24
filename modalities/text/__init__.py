"""Text: folders of .txt/.md/.rst files, JSON-lines files and packaged corpora
(Debian's fortune cookies, gensim's Lee news corpus, sentencepiece's Botchan,
Tux Paint's captioned stamps for image + text), sub-word tokenizers through
Hugging Face tokenizers; BERT, whole-word, span and MEAP masking; masked-LM,
next-token and Starbucks objectives."""
from . import masking as _masking  # noqa: F401  (registers bert, whole_word, span, meap)
from .modality import TextModality  # noqa: F401  (registers "text", next_token, starbucks)

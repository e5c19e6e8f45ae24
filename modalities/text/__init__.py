"""Text: folders of .txt/.md/.rst files, JSON-lines files and packaged corpora
(Debian's fortune cookies, gensim's Lee news corpus, sentencepiece's Botchan,
Tux Paint's captioned stamps for image + text), sub-word tokenizers through
Hugging Face tokenizers."""

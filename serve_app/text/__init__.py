"""Text around the model: tokenizer, chat template, incremental detokenizer."""

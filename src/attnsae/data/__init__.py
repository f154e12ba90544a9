"""The model and what it reads: the pinned model, the text corpus, token rows and the hook_z activation cache."""

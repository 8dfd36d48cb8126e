"""What the model sees for a record: Manga109 preparation, synthetic lines, the dataset, prompt, collator,
image sizing and sample lengths."""

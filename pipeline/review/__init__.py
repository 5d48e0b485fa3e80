"""Views of what the pipeline keeps: the live dashboard, status, the dry-run estimate, the caption report.
Nothing in the pipeline imports them."""

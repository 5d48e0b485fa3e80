"""What goes into a run: dataset layouts and file names, the image index, images, prompts and schemas."""

"""Gradio preview panel. Not imported by ComfyUI: gradio stays out of core/ and nodes/."""

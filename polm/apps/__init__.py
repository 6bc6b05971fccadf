"""Interactive apps (the Gradio app arrives with its own issue)."""

"""Interactive apps: ``polm app`` serves a Gradio page with Chat, Rewards, Train and Plugins tabs.

Gradio is imported only when the app starts (:func:`polm.apps.server.launch`),
so ``import polm`` and the other commands work without the ``app`` extra.
"""

"""FramePack generation on diffusers (torch is imported only by the submodules that need it)."""

# Tests that need root or the netns lab are marked `root` / `lab` (or `netns`); the spt pytest
# plugin (spt.testing.required) skips them as a normal user and requires them as root.

"""The six tabs of the page (and the Tools tab), each a `build(...)` that lays out its widgets and wires them to a
service in sdlora/ui/services/. No tab does work itself."""

from nanosae.viewer.app import create_app, export_static

__all__ = ["create_app", "export_static"]

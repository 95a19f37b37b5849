"""The application of the dummy plugin: it only says when it is called."""


class DummyApp:

    def start(self, loop, manager):
        print("start dummy app", flush=True)

    def stop(self):
        print("stop dummy", flush=True)

    def restart(self):
        print("restart dummy", flush=True)

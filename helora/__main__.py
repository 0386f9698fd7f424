from helora.cli import app

app(prog_name="helora")

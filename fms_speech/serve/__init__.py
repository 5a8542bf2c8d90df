"""`fms-speech serve`: an OpenAI-compatible transcription server (see docs/serving.md).

app.py holds the HTTP API, batcher.py the queue that batches windows of concurrent requests
through the model on one worker thread, server.py the command line and start-up.
"""

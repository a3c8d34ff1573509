// Chat with elmd from Node using the official `ollama` npm package (Ollama's API), streaming
// the answer: what an app that speaks only Ollama's protocol does.
//
//   cd clients/node && npm install && node ollama_chat.mjs "Why is the sky blue?"
//
// ELMD_URL (default http://127.0.0.1:8356), ELMD_API_KEY (if the daemon needs one) and
// ELMD_MODEL (default: the first model the daemon lists) configure it.
import { Ollama } from "ollama";

const key = process.env.ELMD_API_KEY;
const ollama = new Ollama({
  host: process.env.ELMD_URL ?? "http://127.0.0.1:8356",
  headers: key ? { Authorization: `Bearer ${key}` } : {},
});

const model = process.env.ELMD_MODEL ?? (await ollama.list()).models[0].name;
const question = process.argv.slice(2).join(" ") || "Say hello in one sentence.";

const stream = await ollama.chat({
  model,
  messages: [{ role: "user", content: question }],
  options: { num_predict: Number(process.env.ELMD_MAX_TOKENS ?? 256) },
  stream: true,
});
for await (const part of stream) {
  process.stdout.write(part.message.content);
}
process.stdout.write("\n");

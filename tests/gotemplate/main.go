// Command gotemplate renders a chat the way Ollama would for a model created from a Modelfile, so the tests
// can compare it with transformers' apply_chat_template using Ollama's own engine (Go's text/template)
// rather than a re-implementation.
//
// Input (stdin, JSON): {"modelfile": "...", "messages": [api.Message...] or null, "tools": [api.Tool...]}
// Output (stdout, JSON): {"commands": [{"name": ..., "args": ...}], "prompt": "..." or null, "error": "..."}
//
//   - commands: the Modelfile as Ollama's parser reads it (parser.go), or error if it rejects the file.
//   - prompt: with messages, the text Ollama hands to the model for POST /api/chat (template.go); null when
//     the Modelfile has no TEMPLATE (Ollama would then use the GGUF's own template, which is not checked here).
//
// Only the standard library is used, so the tests build it offline. Sources ported: github.com/ollama/ollama
// at fb30760996871fa9460115c753afd2c60d4ab0f7 (parser/parser.go, template/template.go, server/routes.go,
// server/prompt.go, api/types.go).
package main

import (
	"bytes"
	"encoding/json"
	"fmt"
	"os"
	"strings"
)

type request struct {
	Modelfile string     `json:"modelfile"`
	Messages  *[]Message `json:"messages"`
	Tools     []Tool     `json:"tools"`
}

type command struct {
	Name string `json:"name"`
	Args string `json:"args"`
}

type result struct {
	Commands []command `json:"commands"`
	Prompt   *string   `json:"prompt"`
	Error    string    `json:"error,omitempty"`
}

// model is what `ollama create` keeps of a Modelfile that the prompt depends on
// (parser.go CreateRequest: the last TEMPLATE and SYSTEM win; MESSAGE is "role: content").
type model struct {
	Template *Template
	System   string
	Messages []Message
}

func newModel(commands []Command) (*model, error) {
	var m model
	for _, c := range commands {
		switch c.Name {
		case "template":
			// server/create.go setTemplate rejects a TEMPLATE that does not parse; images.go GetModel parses it
			// again with template.Parse when the model is loaded
			t, err := Parse(c.Args)
			if err != nil {
				return nil, fmt.Errorf("template: %w", err)
			}
			m.Template = t
		case "system":
			m.System = c.Args
		case "message":
			role, msg, _ := strings.Cut(c.Args, ": ")
			m.Messages = append(m.Messages, Message{Role: role, Content: msg})
		}
	}
	return &m, nil
}

// chatPrompt is POST /api/chat up to the prompt: server/routes.go ChatHandler prepends the Modelfile's
// MESSAGEs, and its SYSTEM as a first message unless the request starts with a system message of its own;
// server/prompt.go chatPrompt/renderPrompt then executes the template over all of them (no truncation:
// the test conversations are far shorter than num_ctx; no images).
func (m *model) chatPrompt(reqMessages []Message, tools []Tool) (string, error) {
	if len(reqMessages) == 0 {
		return "", fmt.Errorf("no messages: Ollama only loads the model")
	}
	msgs := append(append([]Message{}, m.Messages...), reqMessages...)
	if reqMessages[0].Role != "system" && m.System != "" {
		msgs = append([]Message{{Role: "system", Content: m.System}}, msgs...)
	}
	var b bytes.Buffer
	if err := m.Template.Execute(&b, Values{Messages: msgs, Tools: tools}); err != nil {
		return "", err
	}
	return b.String(), nil
}

func run(req request) result {
	res := result{Commands: []command{}}
	commands, err := ParseFile(strings.NewReader(req.Modelfile))
	if err != nil {
		res.Error = "parse: " + err.Error()
		return res
	}
	for _, c := range commands {
		res.Commands = append(res.Commands, command{c.Name, c.Args})
	}
	m, err := newModel(commands)
	if err != nil {
		res.Error = err.Error()
		return res
	}
	if req.Messages == nil || m.Template == nil {
		return res
	}
	prompt, err := m.chatPrompt(*req.Messages, req.Tools)
	if err != nil {
		res.Error = "execute: " + err.Error()
		return res
	}
	res.Prompt = &prompt
	return res
}

func main() {
	var req request
	if err := json.NewDecoder(os.Stdin).Decode(&req); err != nil {
		fmt.Fprintln(os.Stderr, "gotemplate: bad request:", err)
		os.Exit(2)
	}
	enc := json.NewEncoder(os.Stdout)
	enc.SetEscapeHTML(false)
	if err := enc.Encode(run(req)); err != nil {
		fmt.Fprintln(os.Stderr, "gotemplate:", err)
		os.Exit(1)
	}
}

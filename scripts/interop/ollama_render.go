// Renders an Ollama Modelfile TEMPLATE the way Ollama's chat endpoint executes a Messages-mode template,
// with Go's own text/template: the Modelfile's SYSTEM prepended when the conversation does not start with a
// system message, consecutive same-role messages merged (tool messages aside), all system messages joined
// into .System, the json / currentDate / yesterdayDate functions, missingkey=zero. The API types mirror the
// JSON tags of Ollama's api package (written for ftconv's interop suite, not copied).
//
//	go run ollama_render.go TEMPLATE_FILE SYSTEM_FILE|- CONVERSATION.json
package main

import (
	"encoding/json"
	"fmt"
	"os"
	"strings"
	"text/template"
	"time"
)

type ToolCallFunction struct {
	Index     int            `json:"index"`
	Name      string         `json:"name"`
	Arguments map[string]any `json:"arguments"`
}

type ToolCall struct {
	Function ToolCallFunction `json:"function"`
}

type Message struct {
	Role      string     `json:"role"`
	Content   string     `json:"content"`
	Thinking  string     `json:"thinking,omitempty"`
	ToolCalls []ToolCall `json:"tool_calls,omitempty"`
	ToolName  string     `json:"tool_name,omitempty"`
}

type ToolProperty struct {
	Type        any    `json:"type,omitempty"`
	Items       any    `json:"items,omitempty"`
	Description string `json:"description,omitempty"`
	Enum        []any  `json:"enum,omitempty"`
}

type ToolParameters struct {
	Type       string                  `json:"type"`
	Required   []string                `json:"required,omitempty"`
	Properties map[string]ToolProperty `json:"properties"`
}

type ToolFunction struct {
	Name        string         `json:"name"`
	Description string         `json:"description,omitempty"`
	Parameters  ToolParameters `json:"parameters"`
}

type Tool struct {
	Type     string       `json:"type"`
	Function ToolFunction `json:"function"`
}

type Conversation struct {
	Messages []Message `json:"messages"`
	Tools    []Tool    `json:"tools"`
}

func die(f string, a ...any) {
	fmt.Fprintf(os.Stderr, "ollama_render: "+f+"\n", a...)
	os.Exit(1)
}

func main() {
	if len(os.Args) != 4 {
		die("usage: ollama_render TEMPLATE_FILE SYSTEM_FILE|- CONVERSATION.json")
	}
	tb, err := os.ReadFile(os.Args[1])
	if err != nil {
		die("%v", err)
	}
	system := ""
	if os.Args[2] != "-" {
		sb, err := os.ReadFile(os.Args[2])
		if err != nil {
			die("%v", err)
		}
		system = string(sb)
	}
	cb, err := os.ReadFile(os.Args[3])
	if err != nil {
		die("%v", err)
	}
	var conv Conversation
	if err := json.Unmarshal(cb, &conv); err != nil {
		die("%s: %v", os.Args[3], err)
	}
	funcs := template.FuncMap{
		"json": func(v any) string {
			b, _ := json.Marshal(v)
			return string(b)
		},
		"currentDate":   func() string { return time.Now().Format("2006-01-02") },
		"yesterdayDate": func() string { return time.Now().AddDate(0, 0, -1).Format("2006-01-02") },
	}
	tmpl, err := template.New("").Option("missingkey=zero").Funcs(funcs).Parse(string(tb))
	if err != nil {
		die("template: %v", err)
	}
	msgs := conv.Messages
	if len(msgs) > 0 && msgs[0].Role != "system" && system != "" {
		msgs = append([]Message{{Role: "system", Content: system}}, msgs...)
	}
	var sys []string
	var collated []*Message
	for i := range msgs {
		if msgs[i].Role == "system" {
			sys = append(sys, msgs[i].Content)
		}
		if len(collated) > 0 && collated[len(collated)-1].Role == msgs[i].Role && msgs[i].Role != "tool" {
			collated[len(collated)-1].Content += "\n\n" + msgs[i].Content
		} else {
			collated = append(collated, &msgs[i])
		}
	}
	var sb strings.Builder
	err = tmpl.Execute(&sb, map[string]any{
		"System":     strings.Join(sys, "\n\n"),
		"Messages":   collated,
		"Tools":      conv.Tools,
		"Response":   "",
		"Think":      false,
		"ThinkLevel": "",
		"IsThinkSet": false,
	})
	if err != nil {
		die("execute: %v", err)
	}
	os.Stdout.WriteString(sb.String())
}

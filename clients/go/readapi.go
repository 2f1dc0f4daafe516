package volumeclient

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"strings"
	"time"
)

// ReadAPI reads the daemon's read-only HTTP API (docs/http.md in the daemon's repository):
// operations, volumes, exports and the daemon's readiness. Safe for concurrent use.
type ReadAPI struct {
	base string
	http *http.Client
}

// NewReadAPI reads the daemon at baseURL (its HTTP_ADDR, e.g. "http://127.0.0.1:8080").
// A nil client means one with a 10 s timeout.
func NewReadAPI(baseURL string, client *http.Client) *ReadAPI {
	if client == nil {
		client = &http.Client{Timeout: 10 * time.Second}
	}
	return &ReadAPI{base: strings.TrimRight(baseURL, "/"), http: client}
}

// ReadError is an answer of the read API other than 200: its HTTP status and the body's
// error code (BAD_REQUEST, NOT_FOUND, UNAVAILABLE) and message.
type ReadError struct {
	Doing   string
	Status  int
	Code    string
	Message string
}

func (e *ReadError) Error() string {
	return fmt.Sprintf("volumeclient: %s: HTTP %d %s: %s", e.Doing, e.Status, e.Code, e.Message)
}

// Operation is one operation as the daemon records it.
type Operation struct {
	ID              string          `json:"id"`
	Type            string          `json:"type"`
	Status          Status          `json:"status"`
	VolumeID        string          `json:"volume_id,omitempty"`
	VMID            string          `json:"vm_id,omitempty"`
	CorrelationID   string          `json:"correlation_id,omitempty"`
	Error           *EventError     `json:"error,omitempty"`
	CloudStackJobID string          `json:"cloudstack_job_id,omitempty"`
	Attempts        uint32          `json:"attempts"`
	CreatedAt       time.Time       `json:"created_at"`
	UpdatedAt       time.Time       `json:"updated_at"`
	CompletedAt     *time.Time      `json:"completed_at,omitempty"`
	Request         json.RawMessage `json:"request"`
	Response        json.RawMessage `json:"response,omitempty"`
	Imported        bool            `json:"imported"`
}

// Mapping is where the daemon has a volume attached.
type Mapping struct {
	VolumeID        string     `json:"volume_id"`
	VMID            string     `json:"vm_id"`
	Mode            string     `json:"mode"` // "oma" (the host appliance) or "failover"
	DevicePath      string     `json:"device_path,omitempty"`
	ByIDPath        string     `json:"by_id_path,omitempty"`
	PersistentPath  string     `json:"persistent_path,omitempty"`
	Serial          string     `json:"serial,omitempty"`
	CloudStackState string     `json:"cloudstack_state"`
	LinuxState      string     `json:"linux_state"`
	Size            *uint64    `json:"size,omitempty"`
	LastSync        *time.Time `json:"last_sync,omitempty"`
}

// Export is an NBD export of a host attachment.
type Export struct {
	VolumeID   string    `json:"volume_id"`
	Name       string    `json:"name"`
	URL        string    `json:"url"`
	TargetPath string    `json:"target_path"`
	Status     string    `json:"status"`
	CreatedAt  time.Time `json:"created_at"`
	UpdatedAt  time.Time `json:"updated_at"`
}

// VolumeView is what the daemon knows of one volume.
type VolumeView struct {
	VolumeID      string       `json:"volume_id"`
	Mapping       *Mapping     `json:"mapping"`
	NBDExport     *Export      `json:"nbd_export"`
	LastOperation *Operation   `json:"last_operation"`
	Snapshots     []VolumeSnap `json:"snapshots"`
}

// VolumeSnap is a snapshot the daemon took of a volume and did not delete.
type VolumeSnap struct {
	ID          string    `json:"id"`
	Name        string    `json:"name"`
	State       string    `json:"state"`
	Created     time.Time `json:"created"`
	OperationID string    `json:"operation_id,omitempty"`
}

// Readiness is the daemon's /ready answer (given for 200 and 503 alike).
type Readiness struct {
	Status     string            `json:"status"` // "ready" or "not_ready"
	Role       string            `json:"role"`   // "active" or "standby"
	Components map[string]string `json:"components"`
	Outbox     struct {
		Backlog               *uint64  `json:"backlog"`
		OldestUnpublishedAgeS *float64 `json:"oldest_unpublished_age_s"`
	} `json:"outbox"`
}

// OperationFilter selects operations; the zero value selects all.
type OperationFilter struct {
	Status   Status
	Type     string
	VolumeID string
	VMID     string
	// PageSize per request (the daemon's default when 0); Operations follows every page.
	PageSize int
}

func (r *ReadAPI) get(ctx context.Context, doing, path string, query url.Values, into interface{}, okCodes ...int) (int, error) {
	u := r.base + path
	if len(query) > 0 {
		u += "?" + query.Encode()
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, u, nil)
	if err != nil {
		return 0, fmt.Errorf("volumeclient: %s: %w", doing, err)
	}
	resp, err := r.http.Do(req)
	if err != nil {
		return 0, fmt.Errorf("volumeclient: %s: %w", doing, err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(io.LimitReader(resp.Body, 64<<20))
	if err != nil {
		return resp.StatusCode, fmt.Errorf("volumeclient: %s: reading the answer: %w", doing, err)
	}
	ok := resp.StatusCode == http.StatusOK
	for _, c := range okCodes {
		ok = ok || resp.StatusCode == c
	}
	if !ok {
		var e struct {
			Error struct{ Code, Message string } `json:"error"`
		}
		_ = json.Unmarshal(body, &e)
		return resp.StatusCode, &ReadError{Doing: doing, Status: resp.StatusCode, Code: e.Error.Code, Message: e.Error.Message}
	}
	if err := json.Unmarshal(body, into); err != nil {
		return resp.StatusCode, fmt.Errorf("volumeclient: %s: decoding the answer: %w", doing, err)
	}
	return resp.StatusCode, nil
}

// Operation returns one operation (its id is the command id), or nil when there is none.
func (r *ReadAPI) Operation(ctx context.Context, id string) (*Operation, error) {
	var op Operation
	_, err := r.get(ctx, "reading operation "+id, "/api/v1/operations/"+url.PathEscape(id), nil, &op)
	if e, ok := err.(*ReadError); ok && e.Status == http.StatusNotFound {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	return &op, nil
}

// Operations returns the operations f selects, newest first, following every page.
func (r *ReadAPI) Operations(ctx context.Context, f OperationFilter) ([]Operation, error) {
	q := url.Values{}
	for k, v := range map[string]string{"status": string(f.Status), "type": f.Type, "volume_id": f.VolumeID, "vm_id": f.VMID} {
		if v != "" {
			q.Set(k, v)
		}
	}
	if f.PageSize > 0 {
		q.Set("limit", fmt.Sprint(f.PageSize))
	}
	var all []Operation
	for {
		var page struct {
			Items      []Operation `json:"items"`
			NextCursor *string     `json:"next_cursor"`
		}
		if _, err := r.get(ctx, "listing operations", "/api/v1/operations", q, &page); err != nil {
			return nil, err
		}
		all = append(all, page.Items...)
		if page.NextCursor == nil || *page.NextCursor == "" {
			return all, nil
		}
		q.Set("cursor", *page.NextCursor)
	}
}

// Volume returns what the daemon knows of a volume, or nil when it knows nothing.
func (r *ReadAPI) Volume(ctx context.Context, volumeID string) (*VolumeView, error) {
	var v VolumeView
	_, err := r.get(ctx, "reading volume "+volumeID, "/api/v1/volumes/"+url.PathEscape(volumeID), nil, &v)
	if e, ok := err.(*ReadError); ok && e.Status == http.StatusNotFound {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	return &v, nil
}

// Exports returns the host appliance's NBD exports.
func (r *ReadAPI) Exports(ctx context.Context) ([]Export, error) {
	var list struct {
		Items []Export `json:"items"`
	}
	_, err := r.get(ctx, "listing the NBD exports", "/api/v1/exports", nil, &list)
	return list.Items, err
}

// Status returns the daemon's readiness: its role and every component's state.
func (r *ReadAPI) Status(ctx context.Context) (*Readiness, error) {
	var ready Readiness
	if _, err := r.get(ctx, "reading /ready", "/ready", nil, &ready, http.StatusServiceUnavailable); err != nil {
		return nil, err
	}
	return &ready, nil
}

// Local change (azora): SQL debug logs built only when debug logging is on.
//
// Upstream logs every SQL statement at debug level as
// l.With(fields...).DebugContext(ctx, fmt.Sprintf(">>> %s", query)): With formats its
// attributes (the statement's arguments, i.e. whole documents as JSON) before DebugContext
// checks the level, so a server at the default level paid for a log line it then dropped on
// every statement (4 % of FerretDB's CPU under the mail benchmark). debugSQL checks first.

package fsql

import (
	"context"
	"log/slog"
)

// debugSQL logs prefix+query with fields at debug level, doing nothing when that level is off.
func debugSQL(ctx context.Context, l *slog.Logger, prefix, query string, fields []any) {
	if !l.Enabled(ctx, slog.LevelDebug) {
		return
	}

	l.With(fields...).DebugContext(ctx, prefix+query)
}
